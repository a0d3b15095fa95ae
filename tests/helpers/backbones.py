"""Tiny backbones: random pixels, a small conv net, and the same net exported as a SavedModel."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 32


def pixels(n: int = 2, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def tiny_convnet():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x)


def export_saved_model(folder: Path):
    """A tiny conv net exported as a SavedModel; like a Hub feature vector it takes pixels in [0, 1].

    Returns (the Keras source model, the SavedModel folder).
    """
    source = tiny_convnet()
    # Non-trivial BatchNorm statistics, so inference vs training mode would show.
    source.get_layer("bn").set_weights([np.full(8, 1.5), np.full(8, 0.1), np.full(8, 0.2), np.full(8, 2.0)])
    path = folder / "tiny_savedmodel"
    source.export(str(path), verbose=False)
    return source, path
