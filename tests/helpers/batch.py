"""A published model and image folders for the batch-scoring tests.

The model is published untrained (devtools/published_model.py) on a tiny conv-net SavedModel backbone,
so a module publishes it in seconds; scoring does not care what the weights learned.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.runs import write_image_folder

CLASSES = ("apple", "banana", "cherry")
MODEL_NAME = "tiny-batch"
IMAGE_SIZE = 32
UNREADABLE = {"new/apple/broken.jpg": b"this is not a JPEG", "new/banana/truncated.png": b"\x89PNG\r\n\x1a\n\0\0"}


def tiny_backbone(folder: Path) -> str:
    """A conv net taking any image size, exported as a SavedModel backbone (as TF Hub serves them)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x).export(str(folder), verbose=False)
    return str(folder)


def batch_folder(root: Path, per_class: int = 6) -> Path:
    """`root/new/<class>/<n>.jpg` images plus two files that cannot be decoded and one that is not an image."""
    write_image_folder(root, {name: per_class for name in CLASSES}, splits=("new",), seed=5)
    for relative, data in UNREADABLE.items():
        (root / relative).write_bytes(data)
    (root / "README.txt").write_text("scored images")
    return root


def publish_tiny(publish_uri: str, cache_dir: str, work: Path) -> dict:
    """Publish an untrained tiny classifier as the champion of MODEL_NAME at `publish_uri`, with a reference
    sample of training embeddings from images drawn as `batch_folder` draws its own."""
    from devtools.published_model import publish_untrained

    test = write_image_folder(work / "test-images", {name: 4 for name in CLASSES}, splits=("test",), seed=9)
    encoded = [path.read_bytes() for path in sorted(test.rglob("*.jpg"))]
    train = write_image_folder(work / "train-images", {name: 30 for name in CLASSES}, splits=("train",), seed=3)
    return publish_untrained(publish_uri, MODEL_NAME, CLASSES, IMAGE_SIZE, cache_dir, encoded,
                             backbone=tiny_backbone(work / "backbone"),
                             train_images=[path.read_bytes() for path in sorted(train.rglob("*.jpg"))])


def inverted_folder(root: Path, per_class: int = 10) -> Path:
    """`root/new/<class>/<n>.png`: images drawn as `batch_folder`'s, then inverted (255 - pixel) and noised:
    a batch unlike the training images."""
    from PIL import Image

    write_image_folder(root / "drawn", {name: per_class for name in CLASSES}, splits=("new",), seed=6)
    rng = np.random.default_rng(7)
    for path in sorted((root / "drawn").rglob("*.jpg")):
        pixels = 255 - np.asarray(Image.open(path).convert("RGB"), np.int16) + rng.integers(-60, 60, (32, 32, 3))
        target = root / "new" / path.relative_to(root / "drawn" / "new").with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target)
    return root / "new"


def probabilities_of(table, classes=CLASSES) -> np.ndarray:
    """Probability rows (in class order) rebuilt from a predictions table with top-k = all classes."""
    rows = np.zeros((len(table), len(classes)))
    for rank in range(1, len(classes) + 1):
        pairs = zip(table[f"label_{rank}"], table[f"probability_{rank}"], strict=False)
        for row, (label, probability) in enumerate(pairs):
            rows[row, classes.index(label)] = probability
    return rows
