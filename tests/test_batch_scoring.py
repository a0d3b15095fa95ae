"""Batch scoring's rules without TensorFlow: listing, shard keys, outputs, the shift rule, the params."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import batch_scoring, images, scoring_model
from tasks.batch_config import BatchConfig, check_conf, param_specs
from tasks.batch_scoring import Read
from tasks.errors import ConfigError, DatasetError, TransientError
from tests.helpers.runs import write_image_folder

CLASSES = ("apple", "banana", "cherry")


def reads(*contents: bytes) -> list[Read]:
    return [Read(f"new/{n}.jpg", data, hashlib.sha256(data).hexdigest()) for n, data in enumerate(contents)]


def test_listing_keeps_images_by_name_and_reports_other_files_but_not_hidden_ones(tmp_path):
    write_image_folder(tmp_path, {"a": 2}, splits=("new",))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "new" / "UPPER.JPG").write_bytes(b"x")

    found, others = batch_scoring.list_images(str(tmp_path))

    assert found == ["new/UPPER.JPG", "new/a/0000.jpg", "new/a/0001.jpg"] and others == ["notes.txt"]


def test_shards_cover_the_listing_in_order_without_overlap():
    assert batch_scoring.shard_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert batch_scoring.shard_bounds(6, 3) == [(0, 3), (3, 6)]


def test_shard_key_follows_content_model_and_decoder_not_the_run():
    base = batch_scoring.shard_key("s3://m/v1", "d1", 3, reads(b"a", b"b"))
    assert base == batch_scoring.shard_key("s3://m/v1", "d1", 3, reads(b"a", b"b"))
    assert base != batch_scoring.shard_key("s3://m/v1", "d1", 3, reads(b"a", b"changed"))
    assert base != batch_scoring.shard_key("s3://m/v2", "d1", 3, reads(b"a", b"b"))
    assert base != batch_scoring.shard_key("s3://m/v1", "d2", 3, reads(b"a", b"b"))
    assert base != batch_scoring.shard_key("s3://m/v1", "d1", 5, reads(b"a", b"b"))


def fake_decoder(monkeypatch) -> None:
    """to_rgb: a picture whose size and value follow the first byte (b"bad" does not decode); resize: a crop."""
    def to_rgb(data, max_pixels=None):
        if data == b"bad":
            raise images.ImageDecodeError("not an image")
        return np.full((2 + data[0], 2, 3), data[0], np.uint8)  # two picture sizes in one batch

    monkeypatch.setattr(images, "to_rgb", to_rgb)
    monkeypatch.setattr(images, "resize", lambda pictures, size: pictures[:, :size, :size].astype(np.float32))


def in_folder(folder, batch: list[Read]) -> list[Read]:
    """The reads' files written under `folder`, and the reads as `hash_images` gives them (no bytes)."""
    for read in batch:
        if read.data is not None:
            (folder / read.path).parent.mkdir(parents=True, exist_ok=True)
            (folder / read.path).write_bytes(read.data)
    return [dataclasses.replace(read, data=None) for read in batch]


def fake_model(pixels):
    return np.tile(pixels[:, :1, 0, 0], (1, 3)) / 3, pixels[:, :2, 0, 0]


@pytest.mark.fast
def test_undecodable_images_are_listed_with_the_reason_and_the_rest_scored(monkeypatch, tmp_path):
    fake_decoder(monkeypatch)
    batch = in_folder(tmp_path, reads(*([b"\x01"] * 70 + [b"bad"] + [b"\x02"] * 3))) + [
        Read("gone.jpg", None, None, "cannot be read")]

    scored, probabilities, embeddings, unreadable = batch_scoring.score(str(tmp_path), batch, 2, [fake_model] * 2)

    assert len(scored) == 73 == len(probabilities) == len(embeddings)
    assert {item["path"] for item in unreadable} == {"new/70.jpg", "gone.jpg"}
    assert probabilities[-1, 0] == pytest.approx(2 / 3) and scored[-1].path == "new/73.jpg"
    assert embeddings[-1].tolist() == [2.0, 2.0]


@pytest.mark.fast
def test_pictures_at_the_model_size_go_in_as_decoded_and_only_the_others_are_resized(monkeypatch, tmp_path):
    """Batch order kept; `resize` (which changes no value at the same size) runs only for pictures it changes."""
    def to_rgb(data, max_pixels=None):
        if data == b"bad":
            raise images.ImageDecodeError("not an image")
        return np.full((2 + data[0], 2, 3), data[1], np.uint8)

    resized = []

    def resize(pictures, size):
        resized.append(pictures.shape)
        return pictures[:, :size, :size].astype(np.float32)

    monkeypatch.setattr(images, "to_rgb", to_rgb)
    monkeypatch.setattr(images, "resize", resize)
    seen = []

    def model(pixels):
        seen.append(pixels.copy())
        return fake_model(pixels)

    batch = in_folder(tmp_path, reads(b"\x00\x05", b"\x01\x07", b"bad", b"\x00\x09"))
    scored, _, _, unreadable = batch_scoring.score(str(tmp_path), batch, 2, [model])

    assert [read.path for read in scored] == ["new/0.jpg", "new/1.jpg", "new/3.jpg"]
    assert [item["path"] for item in unreadable] == ["new/2.jpg"]
    [pixels] = seen
    assert pixels.dtype == np.float32 and pixels.shape == (3, 2, 2, 3)
    assert pixels[:, 0, 0, 0].tolist() == [5.0, 7.0, 9.0] and resized == [(1, 3, 2, 3)]


@pytest.mark.fast
def test_pictures_of_other_sizes_are_resized_before_a_lane_holds_too_many(monkeypatch, tmp_path):
    """Past RESIZE_HELD_BYTES of decoded pictures a lane resizes what it holds: same pixels, bounded memory."""
    fake_decoder(monkeypatch)
    resized = []
    crop = images.resize
    monkeypatch.setattr(images, "resize", lambda pictures, size: resized.append(len(pictures)) or crop(pictures, size))
    batch = in_folder(tmp_path, reads(*(bytes([3 + n % 2]) for n in range(6))))
    seen = []

    def model(pixels):
        seen.append(pixels.copy())
        return fake_model(pixels)

    batch_scoring.score(str(tmp_path), batch, 2, [model])
    grouped, calls = seen.pop(), resized.copy()
    monkeypatch.setattr(batch_scoring, "RESIZE_HELD_BYTES", 40)  # a 5 x 2 x 3 picture is 30 bytes
    resized.clear()
    batch_scoring.score(str(tmp_path), batch, 2, [model])

    assert calls == [3, 3] and resized == [1, 1, 1, 1, 1, 1]
    assert np.array_equal(seen.pop(), grouped)


@pytest.mark.fast
def test_a_file_that_is_gone_a_folder_or_a_fifo_is_unreadable_not_fatal(tmp_path):
    """Listed files may change before they are read: each such one gets its reason, none hangs the shard."""
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")  # opening a FIFO for reading would wait for a writer

    hashed = batch_scoring.hash_images(str(tmp_path), ["ok.jpg", "gone.jpg", "folder.jpg", "pipe.jpg"])

    assert hashed[0].sha256 == hashlib.sha256(b"x").hexdigest() and not hashed[0].error
    assert all(read.sha256 is None and read.error.startswith("cannot be read:") for read in hashed[1:])
    assert "not a regular file" in hashed[3].error


@pytest.mark.fast
def test_a_local_listing_finds_what_the_storage_listing_finds(tmp_path):
    """The local listing's own walk: nested folders, a link to a file kept, a linked folder not entered, a
    dangling link and hidden files left out, exactly as storage.list_files has them."""
    write_image_folder(tmp_path / "images", {"a": 2, "b": 1}, splits=("new", "old"))
    root = tmp_path / "images"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "x.png").write_bytes(b"x")
    (root / ".cache").mkdir()
    (root / ".cache" / "y.jpg").write_bytes(b"y")
    (root / "link.jpg").symlink_to(root / "deep" / "er" / "x.png")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "z.jpg").write_bytes(b"z")
    (root / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)

    found, others = batch_scoring.list_images(str(root))

    relative = [Path(uri).relative_to(root).as_posix() for uri in batch_scoring.storage.list_files(str(root))]
    visible = [path for path in relative if not any(part.startswith(".") for part in path.split("/"))]
    assert found + others == sorted(visible) and "link.jpg" in found and "deep/er/x.png" in found
    assert not any(path.startswith("linked/") or path == "dangling.jpg" for path in found)
    assert batch_scoring.list_images(f"file://{root}") == (found, others)


@pytest.mark.fast
def test_a_subfolder_that_cannot_be_read_is_passed_over_as_the_storage_listing_does(monkeypatch, tmp_path):
    write_image_folder(tmp_path, {"a": 1, "b": 1}, splits=("new",))
    real = os.scandir

    def scandir(path):
        if str(path).endswith("/b"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert batch_scoring.list_images(str(tmp_path)) == (["new/a/0000.jpg"], [])


@pytest.mark.fast
def test_a_shard_is_hashed_and_scored_holding_a_file_per_thread_at_most(monkeypatch, tmp_path):
    """Every file read is a tracked object: the most alive at once must not grow with the shard."""
    fake_decoder(monkeypatch)
    monkeypatch.setattr(batch_scoring, "BATCH", 4)
    alive, most = [0], [0]

    class Held(bytes):
        def __del__(self):
            alive[0] -= 1

    real = batch_scoring._read_bytes

    def read_bytes(root, path):
        data = Held(real(root, path))
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        return data

    monkeypatch.setattr(batch_scoring, "_read_bytes", read_bytes)
    contents = [bytes([1 + n % 2]) + n.to_bytes(2, "big") for n in range(60)]
    in_folder(tmp_path, reads(*contents))
    paths = [f"new/{n}.jpg" for n in range(60)]

    hashed = batch_scoring.hash_images(str(tmp_path), paths)
    assert most[0] <= 3 and all(read.data is None and read.sha256 for read in hashed)
    most[0] = 0
    scored, probabilities, _, _ = batch_scoring.score(str(tmp_path), hashed, 2, [fake_model] * 2)

    assert len(scored) == 60 and alive[0] == 0
    assert most[0] <= 2, f"{most[0]} files held at once by two lanes"
    assert [read.sha256 for read in scored] == [hashlib.sha256(data).hexdigest() for data in contents]


@pytest.mark.fast
def test_lanes_score_batches_side_by_side_and_keep_the_listing_order(monkeypatch, tmp_path):
    """Two lanes, one slow: every batch is scored once, both lanes work, and rows come back in listing order."""
    fake_decoder(monkeypatch)
    monkeypatch.setattr(batch_scoring, "BATCH", 3)
    contents = [bytes([n]) for n in range(1, 31)]
    hashed = in_folder(tmp_path, reads(*contents))
    calls = {"slow": 0, "fast": 0}

    def lane(name, pause):
        def model(pixels):
            calls[name] += 1
            time.sleep(pause)
            return fake_model(pixels)
        return model

    scored, probabilities, embeddings, _ = batch_scoring.score(
        str(tmp_path), hashed, 2, [lane("slow", 0.05), lane("fast", 0.0)])

    assert calls["slow"] >= 1 and calls["fast"] >= 1 and calls["slow"] + calls["fast"] == 10
    assert [read.path for read in scored] == [read.path for read in hashed]
    assert probabilities[:, 0].tolist() == pytest.approx([n / 3 for n in range(1, 31)])
    assert embeddings[:, 0].tolist() == [float(n) for n in range(1, 31)]


@pytest.mark.fast
def test_lanes_are_single_threaded_interpreters_one_per_core_up_to_a_cap(monkeypatch, tmp_path):
    """2 cores: two one-thread lanes; 20 cores: MAX_LANES lanes sharing the cores as threads; a SavedModel: one."""
    made = []
    monkeypatch.setattr(scoring_model, "tflite_scorer", lambda path, threads: made.append(threads) or fake_model)
    monkeypatch.setattr(scoring_model, "saved_model_scorer", lambda path: fake_model)
    model = scoring_model.PublishedModel("m", "v1", "s3://m/v1", ("a", "b"), 32, scoring_model.TFLITE_FLOAT32, tmp_path)

    assert len(scoring_model.lanes(model, cores=2)) == 2 and made == [1, 1]
    made.clear()
    assert len(scoring_model.lanes(model, cores=20)) == scoring_model.MAX_LANES == 8 and made == [2] * 8
    saved = dataclasses.replace(model, engine=scoring_model.SAVED_MODEL)
    assert scoring_model.lanes(saved, cores=20) == [fake_model]


@pytest.mark.fast
def test_a_file_changed_between_hashing_and_scoring_fails_the_shard_for_a_retry(monkeypatch, tmp_path):
    fake_decoder(monkeypatch)
    hashed = in_folder(tmp_path, reads(b"\x01", b"\x02"))
    (tmp_path / hashed[1].path).write_bytes(b"\x03")

    with pytest.raises(TransientError, match="new/1.jpg changed"):
        batch_scoring.score(str(tmp_path), hashed, 2, [fake_model] * 2)


@pytest.mark.fast
def test_the_embedding_sample_is_the_lowest_ranks_whatever_the_sharding(tmp_path):
    rng = np.random.default_rng(0)
    everything = reads(*(n.to_bytes(2, "big") for n in range(50)))
    embeddings = rng.normal(size=(50, 4)).astype(np.float32)
    whole = batch_scoring.embedding_sample(everything, embeddings, rows=10)
    shards = []
    for start in (0, 20, 35):
        end = {0: 20, 20: 35, 35: 50}[start]
        paths, sample = batch_scoring.embedding_sample(everything[start:end], embeddings[start:end], rows=10)
        entry = batch_scoring.write_embedding_sample(paths, sample, str(tmp_path / f"{start}.npy"))
        shards.append(batch_scoring.read_embedding_sample(entry, str(tmp_path / f"{start}.npy")))
    sha256_of = {read.path: read.sha256 for read in everything}

    merged = batch_scoring.merged_sample(shards, sha256_of, rows=10)

    assert np.array_equal(merged, whole[1].astype(np.float32)) and merged.shape == (10, 4)
    again = batch_scoring.embedding_sample(everything[:20], embeddings[:20], rows=10)
    assert again[0] == shards[0][0] and whole[1].dtype == np.float16


@pytest.mark.fast
def test_an_altered_embedding_sample_is_refused(tmp_path):
    entry = batch_scoring.write_embedding_sample(["a"], np.ones((1, 2), np.float16), str(tmp_path / "e.npy"))
    (tmp_path / "e.npy").write_bytes((tmp_path / "e.npy").read_bytes()[:-2] + b"\0\0")
    with pytest.raises(DatasetError, match="sha256"):
        batch_scoring.read_embedding_sample(entry, str(tmp_path / "e.npy"))


@pytest.mark.fast
def test_embedding_shift_flags_a_batch_unlike_the_training_sample_and_not_one_like_it():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 16))
    alike = batch_scoring.batch_embedding_shift(reference, rng.normal(size=(200, 16)))
    unlike = batch_scoring.batch_embedding_shift(reference, rng.normal(size=(200, 16)) + 1.5)

    assert alike["status"] == "not shifted" and alike["shifted"] is False
    assert "look like the training sample" in alike["verdict"]
    assert unlike["shifted"] is True and unlike["auc"] > unlike["noise_band"][1]
    assert unlike["auc"] > batch_scoring.EMBEDDING_AUC_THRESHOLD and "looks unlike" in unlike["verdict"]
    assert str(batch_scoring.EMBEDDING_AUC_THRESHOLD) in unlike["verdict"]


@pytest.mark.fast
def test_a_slight_shift_beyond_the_noise_but_under_the_threshold_is_not_flagged():
    rng = np.random.default_rng(2)
    slight = batch_scoring.batch_embedding_shift(rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8)) + 0.15)
    assert slight["beyond_noise"] is True and slight["auc"] <= batch_scoring.EMBEDDING_AUC_THRESHOLD
    assert slight["shifted"] is False and "not above the threshold" in slight["verdict"]


@pytest.mark.fast
def test_embedding_shift_without_a_reference_says_why_and_is_not_fatal():
    answer = batch_scoring.batch_embedding_shift(None, np.zeros((5, 2)), "version v1 has no reference sample")
    assert answer["status"] == "unavailable" and answer["shifted"] is None and "v1" in answer["reason"]
    small = batch_scoring.batch_embedding_shift(np.zeros((2, 2)), np.zeros((50, 2)))
    assert small["status"] == "unavailable" and "fewer than" in small["reason"]


def test_predictions_csv_neutralises_formula_cells_and_parquet_keeps_them(tmp_path):
    scored = reads(b"a", b"b")
    scored[0] = dataclasses.replace(scored[0], path="=HYPERLINK(\"http://x\")")
    table = batch_scoring.predictions_table(scored, np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]),
                                            ("@sum", "banana", "cherry"), 2, "m", "v1", "d1")

    files = batch_scoring.write_predictions(table, str(tmp_path / "predictions"))

    csv = pd.read_csv(files["csv"])
    assert csv.loc[0, "path"].startswith("'=") and csv.loc[1, "label_1"] == "'@sum"
    assert list(table.columns[:6]) == ["path", "sha256", "label_1", "probability_1", "label_2", "probability_2"]
    parquet = pd.read_parquet(files["parquet"])
    assert parquet.loc[0, "path"].startswith("=") and parquet.loc[0, "label_1"] == "banana"
    assert parquet.loc[0, "probability_2"] == pytest.approx(0.2)


def test_shift_rule_flags_a_batch_the_model_is_much_less_sure_of():
    rng = np.random.default_rng(0)
    test = rng.beta(8, 1, 500)
    alike = batch_scoring.confidence_shift(rng.beta(8, 1, 300), test, "t")
    unlike = batch_scoring.confidence_shift(rng.beta(2, 2, 300), test, "t")

    assert alike["shifted"] is False and unlike["shifted"] is True
    assert unlike["ks_distance"] > unlike["critical_value"] and "alpha = 0.01" in unlike["rule"]
    assert batch_scoring.confidence_shift(rng.beta(2, 2, 30), None, "t")["status"] == "unknown"


def test_a_small_batch_does_not_flag_noise():
    rng = np.random.default_rng(1)
    assert batch_scoring.confidence_shift(rng.beta(8, 1, 5), rng.beta(8, 1, 500), "t")["shifted"] is False


def test_summary_counts_every_class_and_bins_the_confidences():
    table = pd.DataFrame({"label_1": ["apple", "apple", "cherry"], "probability_1": [0.95, 0.55, 0.31]})
    summary = batch_scoring.summarize(table, CLASSES, [{"path": "x", "reason": "y"}], None, "t")
    assert summary["counts"] == {"apple": 2, "banana": 0, "cherry": 1}
    assert summary["confidence"]["histogram"]["counts"] == [0, 0, 0, 1, 0, 1, 0, 0, 0, 1]
    assert summary["n_unreadable"] == 1 and summary["shift"]["status"] == "unknown"
    assert summary["embedding_shift"]["status"] == "unavailable"


def test_optional_params_are_nullable_so_the_form_submits_its_defaults():
    specs = param_specs()
    for name in ("model_version", "publish_uri", "predictions_uri"):
        default, schema = specs[name]
        assert default is None and "null" in schema["type"]
    assert BatchConfig(images="x", model_version="").model_version is None
    assert param_specs()["images"][0] == ""  # required: the form asks for it


def test_params_are_checked_with_the_fix_named():
    with pytest.raises(ConfigError, match="shard_size"):
        BatchConfig(images="x", shard_size=0)
    with pytest.raises(ConfigError, match="model_version"):
        BatchConfig(images="x", model_version="../../other")
    with pytest.raises(ConfigError, match="did you mean 'shard_size'"):
        check_conf({"images": "x", "shardsize": 3})


def test_an_archive_is_extracted_once_into_the_workers_cache_and_listed(tmp_path):
    import zipfile

    folder = write_image_folder(tmp_path / "folder", {"a": 3}, splits=("new",))
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*.jpg")):
            bundle.write(path, path.relative_to(folder).as_posix())

    root = batch_scoring.images_root(str(archive), str(tmp_path / "cache"))
    again = batch_scoring.images_root(str(archive), str(tmp_path / "cache"))

    assert root == again and batch_scoring.list_images(root) == (["new/a/0000.jpg", "new/a/0001.jpg",
                                                                  "new/a/0002.jpg"], [])


@pytest.mark.fast
def test_the_reference_sample_is_seeded_bounded_and_loaded_without_pickles(tmp_path):
    from tasks import embedding_reference

    first = embedding_reference.sample_indices(5000, seed=42)
    assert len(first) == embedding_reference.MAX_ROWS and np.array_equal(first, np.unique(first))
    assert np.array_equal(first, embedding_reference.sample_indices(5000, seed=42))
    assert not np.array_equal(first, embedding_reference.sample_indices(5000, seed=43))
    assert embedding_reference.sample_indices(7, seed=0).tolist() == list(range(7))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        embedding_reference.load(tmp_path / "pickled.npy")
