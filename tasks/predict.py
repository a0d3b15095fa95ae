"""Run a classifier over split files: the one place predictions are computed."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tasks.records import image_dataset

Predictions = tuple[np.ndarray, np.ndarray, list[str]]


def predict_records(model, records_path: str | Path, batch_size: int = 64) -> Predictions:
    """(probabilities [n, classes], true labels [n], relative paths) for every record, in file order.

    The image size is read from the model's input, so a champion trained at
    another resolution is scored on the same images.
    """
    return predict_splits(model, [records_path], batch_size)[0]


def predict_splits(model, records_paths: list[str | Path], batch_size: int = 64) -> list[Predictions]:
    """`predict_records` for several split files through one traced, frozen forward pass (`frozen_forward`)."""
    image_size = int(model.input_shape[1])
    forward = frozen_forward(model)
    return [_predict(forward, records_path, image_size, batch_size) for records_path in records_paths]


def frozen_forward(model) -> Callable:
    """The model's inference pass over a batch of images, with its weights frozen into the graph as constants.

    Traced once with a batch-free signature (eager calls take ~2x as long; tracing a
    backbone takes 1–2 s, and a function without a fixed signature traces again for a
    split's short last batch). Frozen, TensorFlow's graph optimiser folds each
    inference-mode BatchNorm into constants and fuses it with the convolution and
    activation around it: EfficientNet-Lite0 at 96 px on two cores takes 1.5 ms an
    image instead of 2.4 with variables, for the same probabilities up to float
    rounding (7e-6 on the demo's test split). Freezing takes 1.5–2 s: for whole splits,
    not a handful of images.
    """
    import tensorflow as tf

    # TensorFlow's own TFLite converter freezes a function with this; it has no public TF2 name
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    image_size = int(model.input_shape[1])
    forward = tf.function(lambda images: model(images, training=False),
                          input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    return lambda images: frozen(images)[0]


def _predict(forward, records_path: str | Path, image_size: int, batch_size: int) -> Predictions:
    probabilities, labels, paths = [], [], []
    for images, batch_labels, batch_paths in image_dataset(records_path, image_size, batch_size, with_paths=True):
        probabilities.append(forward(images).numpy())
        labels.append(batch_labels.numpy())
        paths.extend(p.decode("utf-8") for p in batch_paths.numpy())
    if not probabilities:
        raise ValueError(f"{records_path}: no records to predict")
    return np.concatenate(probabilities), np.concatenate(labels), paths
