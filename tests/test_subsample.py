"""Subsample: a seeded, stratified, checked selection pinned by a byte-stable manifest."""
from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tasks import artifacts, records, storage
from tasks.config import RunConfig
from tasks.datasets import DatasetError
from tasks.steps import subsample as subsample_module
from tasks.steps.acquire import acquire
from tasks.steps.subsample import subsample
from tests.helpers.runs import write_image_folder


def config(folder: Path, tmp_path: Path, **params) -> RunConfig:
    """A run over a tiny folder: 50% of 12 train images per class unless told otherwise."""
    return RunConfig(**{"source": str(folder), "run_root": str(tmp_path / "runs"),
                        "cache_dir": str(tmp_path / "cache"), "train_percent": 50, **params})


def acquired_subsample(cfg: RunConfig) -> dict:
    """Subsample as the DAG runs it: on what acquire indexed."""
    return subsample(cfg, acquire(cfg))


def manifest_of(cfg: RunConfig) -> dict:
    return storage.read_json(cfg.artifact(artifacts.MANIFEST))


def test_counts_follow_percent_val_fraction_and_test_percent(image_folder, tmp_path):
    cfg = config(image_folder, tmp_path, train_percent=50, val_fraction=0.34, test_percent=50)
    result = acquired_subsample(cfg)
    assert result["counts"] == {"train": 12, "val": 6, "test": 6}
    assert result["n_classes"] == 3 and result["n_skipped"] == 0
    manifest = manifest_of(cfg)
    assert manifest["classes"] == ["apple", "banana", "cherry"]
    assert manifest["counts"]["val"] == {"apple": 2, "banana": 2, "cherry": 2}
    assert manifest["hash"] == result["hash"]
    assert manifest["params"] == {"classes": None, "train_percent": 50, "train_count": 0, "val_fraction": 0.34,
                                  "test_percent": 50}
    splits_of_paths = {f["path"]: f["split"] for f in manifest["files"]}
    assert all(splits_of_paths[p].startswith(("train", "val")) for p in splits_of_paths if p.startswith("train/"))
    assert all(splits_of_paths[p] == "test" for p in splits_of_paths if p.startswith("test/"))


def test_train_count_is_absolute_per_class_and_val_keeps_one_per_class(image_folder, tmp_path):
    result = acquired_subsample(config(image_folder, tmp_path, train_count=3, val_fraction=0.1))
    assert result["counts"] == {"train": 6, "val": 3, "test": 12}


def test_same_inputs_and_seed_give_a_byte_identical_manifest(image_folder, tmp_path):
    first = config(image_folder, tmp_path, run_id="first", seed=7)
    second = config(image_folder, tmp_path, run_id="second", seed=7)
    acquired_subsample(first)
    acquired_subsample(second)
    assert storage.read_bytes(first.artifact(artifacts.MANIFEST)) == storage.read_bytes(
        second.artifact(artifacts.MANIFEST))


def test_split_files_are_the_same_whether_chunks_decode_in_threads_or_in_the_caller(image_folder, tmp_path,
                                                                                    monkeypatch):
    apples = image_folder / "train" / "apple"
    (apples / "truncated.jpg").write_bytes((apples / "0000.jpg").read_bytes()[:100])
    monkeypatch.setattr(subsample_module, "INGEST_CHUNK", 5)  # several chunks per split, a short one last
    outputs = {}
    for name, threshold in (("threads", 1), ("caller", 10**12)):
        monkeypatch.setattr(subsample_module, "THREADED_PIXELS", threshold)
        cfg = config(image_folder, tmp_path, run_id=name, train_percent=100)
        acquired_subsample(cfg)
        outputs[name] = [storage.read_bytes(cfg.artifact(artifacts.MANIFEST))] + [
            storage.read_bytes(cfg.artifact(artifacts.split_records(split))) for split in records.SPLITS]
    assert outputs["threads"] == outputs["caller"]
    assert b"truncated.jpg" in outputs["caller"][0]  # listed as skipped by both


def test_only_chunks_of_large_images_go_to_the_decoding_threads():
    side = int(subsample_module.THREADED_PIXELS ** 0.5)
    assert subsample_module._threaded([(b"", (side, side)), "unreadable"])
    assert subsample_module._threaded([(b"", (28, 28)), (b"", (1, 2 * side * side - 28 * 28))])  # the mean decides
    assert not subsample_module._threaded([(b"", (side, side - 1)), "too large"])
    assert not subsample_module._threaded(["not a decodable image", "unreadable"])


def test_another_seed_selects_other_images(image_folder, tmp_path):
    one = acquired_subsample(config(image_folder, tmp_path, run_id="one", seed=1))
    two = acquired_subsample(config(image_folder, tmp_path, run_id="two", seed=2))
    assert one["counts"] == two["counts"]
    assert one["hash"] != two["hash"]


def test_first_n_classes_and_named_classes_keep_dataset_order(image_folder, tmp_path):
    first_two = acquired_subsample(config(image_folder, tmp_path, run_id="n", classes=2))
    named = acquired_subsample(config(image_folder, tmp_path, run_id="names", classes="cherry, apple"))
    assert manifest_of(config(image_folder, tmp_path, run_id="n"))["classes"] == ["apple", "banana"]
    assert manifest_of(config(image_folder, tmp_path, run_id="names"))["classes"] == ["apple", "cherry"]
    assert first_two["n_classes"] == named["n_classes"] == 2


def test_unknown_class_is_an_error_listing_the_available_ones(image_folder, tmp_path):
    with pytest.raises(DatasetError, match=r"\['durian'\] are not in .*available: \['apple', 'banana', 'cherry'\]"):
        acquired_subsample(config(image_folder, tmp_path, classes="apple,durian"))


def test_corrupt_truncated_and_non_image_files_are_skipped_with_reasons(image_folder, tmp_path):
    apples = image_folder / "train" / "apple"
    good = (apples / "0000.jpg").read_bytes()
    (apples / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (apples / "notes.jpg").write_text("not an image")
    (apples / "empty.png").write_bytes(b"")
    cfg = config(image_folder, tmp_path, train_percent=100)
    result = acquired_subsample(cfg)
    manifest = manifest_of(cfg)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"train/apple/truncated.jpg", "train/apple/notes.jpg", "train/apple/empty.png"}
    assert all(reason.startswith("not a decodable image: ") for reason in reasons.values())
    assert "none of the signatures of JPEG, PNG, GIF, BMP, WEBP" in reasons["train/apple/notes.jpg"]
    assert result["n_skipped"] == 3
    assert result["counts"]["train"] + result["counts"]["val"] == 36
    assert not set(reasons) & {f["path"] for f in manifest["files"]}


def test_class_left_without_images_in_a_split_is_an_error_naming_it(image_folder, tmp_path):
    for path in (image_folder / "test" / "banana").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"class 'banana' has no usable images in the test split.*4 skipped"):
        acquired_subsample(config(image_folder, tmp_path))


def test_one_selected_image_cannot_feed_validation(image_folder, tmp_path):
    with pytest.raises(DatasetError, match="class 'apple' has 12 train images and train_count=1 selects 1, but a "
                                           "validation split needs at least 2 .*set train_count to at least 2"):
        acquired_subsample(config(image_folder, tmp_path, train_count=1))


def test_too_small_a_share_for_validation_says_how_many_images_would_do_and_that_works(image_folder, tmp_path):
    with pytest.raises(DatasetError) as refused:
        acquired_subsample(config(image_folder, tmp_path, train_percent=10, val_fraction=0.2))
    message = str(refused.value)
    assert message.startswith("class 'apple' has 12 train images and train_percent=10 selects 1, but a validation "
                              "split needs at least 2 selected (at val_fraction=0.2: 1 for validation")
    assert "set train_percent to at least 13, add 3 more train images to it (15 at train_percent=10)" in message

    result = acquired_subsample(config(image_folder, tmp_path, train_percent=13, val_fraction=0.2))
    assert result["counts"] == {"train": 3, "val": 3, "test": 12}

    apples = image_folder / "train" / "apple"
    for n in range(3):
        shutil.copy(apples / "0000.jpg", apples / f"extra{n}.jpg")
    with pytest.raises(DatasetError, match="class 'banana' has 12"):
        acquired_subsample(config(image_folder, tmp_path, train_percent=10, val_fraction=0.2))


def test_a_class_with_one_image_is_told_to_get_more(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"apple": 4, "lonely": 1})
    with pytest.raises(DatasetError, match="class 'lonely' has 1 train images and train_percent=50 selects 1, .*: "
                                           r"add 2 more train images to it \(3 at train_percent=50\), or drop"):
        acquired_subsample(config(folder, tmp_path))


def test_records_hold_the_manifest_files_with_their_labels(image_folder, tmp_path):
    cfg = config(image_folder, tmp_path)
    acquired_subsample(cfg)
    manifest = manifest_of(cfg)
    for split in records.SPLITS:
        expected = {f["path"]: f["label"] for f in manifest["files"] if f["split"] == split}
        dataset = records.image_dataset(cfg.artifact(artifacts.split_records(split)), image_size=32, batch_size=8,
                                        with_paths=True)
        seen = {}
        for images, labels, paths in dataset:
            assert images.shape[1:] == (32, 32, 3)
            seen.update({p.decode(): int(label) for p, label in zip(paths.numpy(), labels.numpy(), strict=False)})
        assert seen == expected
        classes = {f["class"] for f in manifest["files"] if f["split"] == split}
        assert classes == {"apple", "banana", "cherry"}


def test_outputs_go_to_an_s3_run_root(s3_bucket, image_folder, tmp_path):
    cfg = RunConfig(source=str(image_folder), run_root=f"{s3_bucket}/runs", cache_dir=str(tmp_path / "cache"),
                    train_percent=50)
    result = acquired_subsample(cfg)
    assert result["manifest"] == f"{s3_bucket}/runs/transfer_learning/manual/data/manifest.json"
    assert storage.read_json(result["manifest"])["hash"] == result["hash"]
    local = storage.download(cfg.artifact(artifacts.split_records("train")), tmp_path / "train.tfrecord")
    assert len(list(records.iter_records(local))) == result["counts"]["train"]


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels: a decompression bomb's calling card."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def _png_with_bad_text_crc(width: int, height: int) -> bytes:
    """A PNG that Pillow refuses (its tEXt chunk's CRC is wrong) while TensorFlow would decode it."""
    data = _png_declaring(width, height)
    iend = data.index(b"IDAT") - 4
    text = struct.pack(">I", 5) + b"tEXtk\x00abc" + b"\xde\xad\xbe\xef"
    return data[:iend] + text + data[iend:]


def test_images_above_the_pixel_limit_are_skipped_before_decoding(image_folder, tmp_path, monkeypatch):
    apples = image_folder / "train" / "apple"
    (apples / "bomb.png").write_bytes(_png_declaring(100_000, 100_000))
    (apples / "refused-by-pillow.png").write_bytes(_png_with_bad_text_crc(50_000, 50_000))
    Image.new("RGB", (64, 64)).save(apples / "large.png")
    monkeypatch.setenv("TLP_MAX_IMAGE_PIXELS", str(48 * 48))
    decoded = []
    canonical = subsample_module.images.canonical_png
    monkeypatch.setattr(subsample_module.images, "canonical_png",
                        lambda data, **kw: decoded.append(data) or canonical(data, **kw))
    cfg = config(image_folder, tmp_path, train_percent=100)
    acquired_subsample(cfg)
    reasons = {s["path"]: s["reason"] for s in manifest_of(cfg)["skipped"]}
    assert set(reasons) == {"train/apple/bomb.png", "train/apple/large.png", "train/apple/refused-by-pillow.png"}
    assert reasons["train/apple/large.png"].startswith("decompression bomb: 64x64 pixels, above the limit of 2,304")
    assert reasons["train/apple/bomb.png"].startswith("decompression bomb: 100000x100000 pixels")
    assert reasons["train/apple/refused-by-pillow.png"].startswith("decompression bomb: 50000x50000 pixels")
    assert decoded, "the other images were decoded"
    too_large = {(apples / name).read_bytes() for name in ("bomb.png", "large.png", "refused-by-pillow.png")}
    assert not too_large & set(decoded), "no file above the limit reached the decoder"


def test_a_file_above_the_byte_limit_is_skipped_unread(image_folder, tmp_path, monkeypatch):
    apples = image_folder / "train" / "apple"
    Image.effect_noise((200, 200), 64).save(apples / "heavy.png")
    monkeypatch.setenv("TLP_MAX_IMAGE_BYTES", "20000")
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **kw: opened.append(self.name) or real_open(self, *a, **kw))
    cfg = config(image_folder, tmp_path, train_percent=100)
    acquired_subsample(cfg)
    reasons = {s["path"]: s["reason"] for s in manifest_of(cfg)["skipped"]}
    assert list(reasons) == ["train/apple/heavy.png"]
    assert reasons["train/apple/heavy.png"].startswith("too large: ")
    assert "TLP_MAX_IMAGE_BYTES" in reasons["train/apple/heavy.png"]
    assert "heavy.png" not in opened


def test_an_unreadable_header_is_skipped_and_listed(image_folder, tmp_path):
    apples = image_folder / "train" / "apple"
    broken = bytearray(_png_declaring(8, 8))
    broken[20] ^= 0xFF  # the IHDR's CRC no longer matches
    (apples / "broken-header.png").write_bytes(bytes(broken))
    cfg = config(image_folder, tmp_path, train_percent=100)
    acquired_subsample(cfg)
    reasons = {s["path"]: s["reason"] for s in manifest_of(cfg)["skipped"]}
    assert reasons == {"train/apple/broken-header.png": "not a decodable image: a PNG whose IHDR header is damaged "
                                                        "(its CRC does not match)"}


def test_records_store_the_decoded_pixels_and_the_original_file(image_folder, tmp_path):
    from tasks import images

    cfg = config(image_folder, tmp_path)
    acquired_subsample(cfg)
    local = storage.download(cfg.artifact(artifacts.split_records("test")), tmp_path / "test.tfrecord")
    [(stored, _, path)] = list(records.iter_records(local))[:1]
    [(original, original_path)] = records.originals(local, 1)
    assert original_path == path and original == (image_folder / path).read_bytes()
    assert (images.to_rgb(stored) == images.to_rgb(original)).all()


def test_an_original_is_stored_once_when_it_is_already_the_canonical_image(tmp_path):
    import tensorflow as tf

    from tasks import images

    plain = io.BytesIO()
    Image.new("L", (6, 5), 77).save(plain, format="PNG")
    photo = io.BytesIO()
    Image.new("RGB", (6, 5), (200, 10, 30)).save(photo, format="JPEG")
    path = tmp_path / "split.tfrecord"
    records.write_records(path, [(plain.getvalue(), 0, "a/plain.png"), (photo.getvalue(), 1, "b/photo.jpg")])
    stored = [tf.train.Example.FromString(raw.numpy()).features.feature for raw in tf.data.TFRecordDataset(str(path))]
    assert "original" not in stored[0] and "original" in stored[1]
    assert stored[0]["image"].bytes_list.value[0] == plain.getvalue()
    assert records.originals(path, 2) == [(plain.getvalue(), "a/plain.png"), (photo.getvalue(), "b/photo.jpg")]
    canonical = stored[1]["image"].bytes_list.value[0]
    assert canonical != photo.getvalue() and (images.to_rgb(canonical) == images.to_rgb(photo.getvalue())).all()


def test_the_manifest_records_the_image_sizes_that_image_size_auto_decides_by(tmp_path):
    from tasks.config import auto_image_size

    root = tmp_path / "sized"
    for split, (width, height) in (("train", (200, 150)), ("test", (40, 60))):
        for name in ("apple", "banana"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for n in range(4):
                Image.new("RGB", (width, height), (n * 60, 90, 30)).save(folder / f"{n}.png")
    cfg = config(root, tmp_path, train_percent=100, val_fraction=0.25)
    acquired_subsample(cfg)
    sizes = manifest_of(cfg)["image_sizes"]
    assert sizes["train"]["images"] == 6 and sizes["val"]["images"] == 2 and sizes["test"]["images"] == 8
    assert sizes["train"]["short_side"]["median"] == 150  # the shorter side, whichever it is
    assert (sizes["train"]["width"]["median"], sizes["train"]["height"]["median"]) == (200, 150)
    assert sizes["test"]["short_side"] == {"min": 40, "p25": 40, "median": 40, "p75": 40, "max": 40}
    assert auto_image_size(manifest_of(cfg))[0] == 128
