"""Batch scoring through its three steps on a published model: outputs, reuse by content, the golden batch,
and refusals (an altered version, a location that is not the deployment's)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks import artifacts, batch_scoring, images, scoring_model, storage
from tasks.batch_config import BatchConfig
from tasks.errors import ConfigError, ScoringError
from tasks.steps.list_images import list_images
from tasks.steps.merge_predictions import merge_predictions
from tasks.steps.score_shard import score_shard
from tests.helpers.batch import (
    CLASSES,
    MODEL_NAME,
    UNREADABLE,
    batch_folder,
    inverted_folder,
    probabilities_of,
    publish_tiny,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, cache_dir):
    """A local deployment with a published tiny champion; returns its folder."""
    root = tmp_path_factory.mktemp("deployment")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLP_PUBLISH_URI", str(root / "models"))
        publish_tiny(str(root / "models"), cache_dir, root / "work")
    return root


@pytest.fixture
def deploy(deployment, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("TLP_PUBLISH_URI", str(deployment / "models"))
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("TLP_PREDICTIONS_URI", str(tmp_path / "predictions"))
    monkeypatch.setenv("TLP_CACHE_DIR", cache_dir)
    return deployment


def run_steps(cfg: BatchConfig) -> tuple[list[dict], dict]:
    """What the DAG does, in order: list (fixing the model version), score every shard, merge; every step gets
    the config of the run's params."""
    scored = [score_shard(cfg, shard) for shard in list_images(cfg)]
    return scored, merge_predictions(cfg)


def config(images_uri, run_id: str, **values) -> BatchConfig:
    return BatchConfig(**{"images": str(images_uri), "model_name": MODEL_NAME, "run_id": run_id, "shard_size": 5,
                          "top_k": 3, **values})


def test_scores_every_image_lists_unreadable_ones_and_writes_parquet_csv_summary_gallery(deploy, tmp_path):
    folder = batch_folder(tmp_path / "images")
    scored, merged = run_steps(config(folder, "first"))

    assert merged["n_listed"] == 3 * 6 + len(UNREADABLE) and merged["n_unreadable"] == len(UNREADABLE)
    assert merged["n_scored"] == 3 * 6 and not any(shard["reused"] for shard in scored)
    table = pd.read_parquet(merged["predictions"]["parquet"])
    assert sorted(table["path"]) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("0*.jpg"))
    assert set(table["sha256"]) == {batch_scoring.hashlib.sha256(p.read_bytes()).hexdigest()
                                    for p in folder.rglob("0*.jpg")}
    assert np.allclose(probabilities_of(table).sum(axis=1), 1, atol=1e-4)
    assert (table["probability_1"] >= table["probability_2"]).all()
    assert set(table["decoder_version"]) == {images.DECODER_VERSION} and table["model_version"].nunique() == 1
    assert len(pd.read_csv(merged["predictions"]["csv"])) == len(table)
    summary = json.loads((tmp_path / "predictions" / MODEL_NAME / "runs" / "batch_predict" / "first" /
                          "summary.json").read_text())
    assert sorted(item["path"] for item in summary["unreadable"]) == sorted(UNREADABLE)
    assert sum(summary["counts"].values()) == 18 and list(summary["counts"]) == list(CLASSES)
    assert sum(summary["confidence"]["histogram"]["counts"]) == 18
    assert summary["other_files"] == ["README.txt"]
    assert summary["shift"]["status"] in ("shifted", "not shifted") and summary["shift"]["n_test"] == 12
    embedding = summary["embedding_shift"]
    assert embedding["status"] == "not shifted" and embedding["shifted"] is False and merged["embedding_auc"]
    assert embedding["n_reference"] == 90 and embedding["n_batch"] == 18 and len(embedding["noise_band"]) == 2
    assert "looks unlike" not in embedding["verdict"]
    cfg = config(folder, "first")
    gallery = storage.read_text(cfg.artifact(artifacts.BATCH_GALLERY))
    assert gallery.count("<figure>") == min(cfg.gallery_size, 18) and "data:image/png;base64," in gallery
    assert "Embedding shift: the batch&#x27;s embeddings look like the training sample&#x27;s: AUC" in gallery


def test_a_batch_unlike_the_training_images_is_said_to_be_so(deploy, tmp_path):
    _, merged = run_steps(config(inverted_folder(tmp_path / "inverted"), "inverted"))

    summary = storage.read_json(merged["summary_uri"])
    embedding = summary["embedding_shift"]
    assert embedding["shifted"] is True and merged["embedding_shifted"] is True
    assert embedding["auc"] > max(embedding["noise_band"][1], batch_scoring.EMBEDDING_AUC_THRESHOLD)
    assert embedding["verdict"].startswith("the batch looks unlike the model's training data")
    gallery = storage.read_text(config(tmp_path, "inverted").artifact(artifacts.BATCH_GALLERY))
    assert "looks unlike the model&#x27;s training data" in gallery


def test_a_version_without_a_reference_sample_says_the_comparison_is_unavailable(deploy, tmp_path, monkeypatch):
    from tasks import embedding_reference

    champion = json.loads((deploy / "models" / MODEL_NAME / "champion.json").read_text())
    copy = tmp_path / "models"
    storage.upload(deploy / "models", str(copy))
    version = copy / MODEL_NAME / "versions" / champion["version"]
    checksums = json.loads((version / "checksums.json").read_text())
    for name in (embedding_reference.FILE, embedding_reference.META_FILE):
        (version / name).unlink()
        del checksums[name]
    (version / "checksums.json").write_text(json.dumps(checksums))
    monkeypatch.setenv("TLP_PUBLISH_URI", str(copy))

    _, merged = run_steps(config(batch_folder(tmp_path / "images"), "older"))

    embedding = storage.read_json(merged["summary_uri"])["embedding_shift"]
    assert embedding["status"] == "unavailable" and embedding["auc"] is None
    assert "without a reference sample" in embedding["reason"] and merged["n_scored"] == 18


def test_rerun_reuses_finished_shards_and_scores_a_changed_image_again(deploy, tmp_path):
    folder = batch_folder(tmp_path / "images")
    first, _ = run_steps(config(folder, "first"))
    changed = min(folder.rglob("0*.jpg"))
    changed.write_bytes(max(folder.rglob("0*.jpg")).read_bytes())

    second, again = run_steps(config(folder, "second"))

    rescored = [shard["index"] for shard in second if not shard["reused"]]
    assert len(rescored) == 1, second
    assert [shard["key"] for shard in first if shard["index"] != rescored[0]] == \
        [shard["key"] for shard in second if shard["index"] != rescored[0]]
    table = pd.read_parquet(again["predictions"]["parquet"]).set_index("path")
    relative = changed.relative_to(folder).as_posix()
    assert table.loc[relative, "sha256"] == batch_scoring.hashlib.sha256(changed.read_bytes()).hexdigest()
    assert again["n_reused_shards"] == len(second) - 1


def test_the_listing_fixes_the_champion_for_every_shard_and_the_merge(deploy, tmp_path, monkeypatch):
    cfg = config(batch_folder(tmp_path / "images"), "fixed-version")
    assert cfg.model_version is None
    champion = json.loads((deploy / "models" / MODEL_NAME / "champion.json").read_text())

    shards = list_images(cfg)
    monkeypatch.setattr(scoring_model, "resolve_version",
                        lambda *args: pytest.fail("a step after list_images resolved the version again"))
    scored = [score_shard(cfg, shard) for shard in shards]
    merged = merge_predictions(cfg)

    assert storage.read_json(cfg.artifact(artifacts.BATCH_LISTING))["model_version"] == champion["version"]
    assert merged["model_version"] == champion["version"] and all(not shard["reused"] for shard in scored)
    assert set(pd.read_parquet(merged["predictions"]["parquet"])["model_version"]) == {champion["version"]}


def test_a_version_that_is_not_published_is_refused_before_anything_is_listed(deploy, tmp_path):
    cfg = config(batch_folder(tmp_path / "images"), "unpublished", model_version="20260101T000000.000Z-0123456789ab")

    with pytest.raises(ScoringError, match="not a complete published version"):
        list_images(cfg)
    assert not storage.exists(cfg.artifact(artifacts.BATCH_LISTING))


def test_a_retried_shard_rewrites_the_same_predictions(deploy, tmp_path):
    cfg = config(batch_folder(tmp_path / "images"), "retry")
    [shard, *_] = list_images(cfg)
    first = score_shard(cfg, shard)
    prefix = batch_scoring.shard_prefix(cfg.output_root, first["key"])
    storage.delete(storage.join(prefix, batch_scoring.SHARD_RECORD))  # a crash before the shard was complete
    written = {name: storage.read_bytes(storage.join(prefix, name))
               for name in ("predictions.csv", "predictions.parquet", batch_scoring.EMBEDDINGS)}

    again = score_shard(cfg, shard)

    assert not again["reused"] and again["key"] == first["key"]
    assert {name: storage.read_bytes(storage.join(prefix, name)) for name in written} == written


def test_scores_match_the_published_classifier_on_the_golden_batch(deploy, tmp_path, cache_dir):
    """What is served in bulk answers like the model that was evaluated: the serving check's golden batch is
    the test images through the classifier; batch scoring must give the same labels and near probabilities."""
    from devtools.published_model import keras_probabilities

    golden = sorted((deploy / "work" / "test-images").rglob("*.jpg"))
    cfg = config(deploy / "work" / "test-images", "golden", top_k=len(CLASSES))
    _, merged = run_steps(cfg)
    table = pd.read_parquet(merged["predictions"]["parquet"]).set_index("path").loc[
        [path.relative_to(deploy / "work" / "test-images").as_posix() for path in golden]]
    champion = json.loads((deploy / "models" / MODEL_NAME / "champion.json").read_text())
    expected = keras_probabilities(champion["uri"], [path.read_bytes() for path in golden], cache_dir, tmp_path)

    scored = probabilities_of(table.reset_index())
    assert (scored.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(scored - expected).max() <= batch_scoring.GOLDEN_TOLERANCE


def test_the_model_sees_the_one_decoders_pixels_at_its_size_and_at_any_other(tmp_path):
    """A picture already at the model's size skips `resize` (TensorFlow not needed): that must change no value,
    so every image reaches the model exactly as `images.decode` (to_rgb, then the one resize) gives it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(32, 32), (32, 32), (48, 40), (20, 32), (32, 32)]
    for n, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{n}.jpg" if n % 2 else tmp_path / f"{n}.png")
    paths = sorted(path.name for path in tmp_path.iterdir())
    seen = []

    def model(pixels):
        seen.append(pixels.copy())
        return np.zeros((len(pixels), 2), np.float32), None

    hashed = batch_scoring.hash_images(str(tmp_path), paths)
    scored, _, _, unreadable = batch_scoring.score(str(tmp_path), hashed, 32, [model])

    assert not unreadable and [read.path for read in scored] == paths
    expected = np.stack([images.decode((tmp_path / path).read_bytes(), 32) for path in paths])
    assert np.array_equal(np.concatenate(seen), expected)
    same = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(images.resize(same, 32)), same.astype(np.float32))


def test_an_altered_published_file_is_refused_not_loaded(deploy, tmp_path, cache_dir):
    champion = json.loads((deploy / "models" / MODEL_NAME / "champion.json").read_text())
    copy = tmp_path / "models"
    storage.upload(deploy / "models", str(copy))
    version = copy / MODEL_NAME / "versions" / champion["version"]
    tflite = version / scoring_model.SCORING_FILE
    tflite.write_bytes(tflite.read_bytes()[:-16] + b"\0" * 16)

    with pytest.raises(ScoringError, match="does not match the sha256"):
        scoring_model.fetch(str(copy), MODEL_NAME, champion["version"], str(tmp_path / "fresh-cache"))
    reference = version / "reference" / "embeddings.npy"
    reference.write_bytes(reference.read_bytes()[:-4] + bytes(byte ^ 0xFF for byte in reference.read_bytes()[-4:]))
    with pytest.raises(ScoringError, match="does not match the sha256"):
        scoring_model.fetch_reference(str(copy), MODEL_NAME, champion["version"], str(tmp_path / "other-cache"))


def test_locations_outside_the_deployment_are_refused(deploy, tmp_path):
    from tasks import settings

    cfg = config(tmp_path, "elsewhere", publish_uri=str(tmp_path / "someone-elses-models"))
    with pytest.raises(ConfigError, match="publish_uri"):
        cfg.check_locations(settings.load())
    cfg = config(tmp_path, "elsewhere", predictions_uri="s3://other-bucket/out")
    with pytest.raises(ConfigError, match="predictions_uri"):
        cfg.check_locations(settings.load())


def test_the_savedmodel_fallback_scans_then_scores_like_the_tflite_variant(deploy, tmp_path, cache_dir):
    from tasks import images as decoder

    champion = json.loads((deploy / "models" / MODEL_NAME / "champion.json").read_text())
    pictures = np.stack([decoder.decode(path.read_bytes(), 32)
                         for path in sorted((deploy / "work" / "test-images").rglob("*.jpg"))[:8]])
    answers = {}
    for engine in (scoring_model.TFLITE_FLOAT32, scoring_model.SAVED_MODEL):
        model = scoring_model.fetch(str(deploy / "models"), MODEL_NAME, champion["version"], cache_dir, engine)
        assert model.engine == engine
        answers[engine] = scoring_model.scorer(model)(pictures)

    (tflite, tflite_embeddings), (saved, saved_embeddings) = answers.values()
    assert np.abs(tflite - saved).max() <= 1e-4 and np.abs(tflite_embeddings - saved_embeddings).max() <= 1e-4
    assert tflite_embeddings.shape == (8, 8)
