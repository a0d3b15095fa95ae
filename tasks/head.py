"""The classifier head, the augmentation block, and how both meet the backbone.

One place builds these so that feature extraction (head on cached features, or
on augmented images), fine-tuning and the published model all share the same
layers: the head trained on cached features is the very layer object that ends
up in the image-in/probabilities-out model.
"""
from __future__ import annotations

import keras

from tasks.backbones import Backbone

HEAD_NAME = "head"
AUGMENTATION_NAME = "augmentation"


def build_head(feature_shape: tuple[int, ...], num_classes: int, dropout: float) -> keras.Model:
    """Features -> (global pooling if the backbone did not pool) -> dropout -> dense softmax."""
    inputs = keras.Input(feature_shape, name="features")
    x = inputs
    if len(feature_shape) == 3:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=HEAD_NAME)


def augmentation(seed: int) -> keras.Sequential:
    """Mild, label-preserving changes that suit generic photos and product shots alike.

    Active only while training; seeded so a resumed run draws the same changes.
    """
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.05, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 2),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed + 3),
    ], name=AUGMENTATION_NAME)


def compose(backbone: Backbone, head: keras.Model, augment: keras.Sequential | None = None) -> keras.Model:
    """Raw [0, 255] pixels in, class probabilities out.

    The backbone is always called with training=False, so its BatchNorm layers
    keep their ImageNet statistics even where some backbone layers are trainable.
    Pass `augment` only for the model that is trained; the published model has none.
    """
    size = int(backbone.model.input_shape[1])
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs if augment is None else augment(inputs)
    x = backbone.model(x, training=False)
    return keras.Model(inputs, head(x), name="classifier")
