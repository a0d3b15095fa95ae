"""Run a classifier over a split file: the one place predictions are computed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.records import image_dataset


def predict_records(model, records_path: str | Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probabilities [n, classes], true labels [n], relative paths) for every record, in file order.

    The image size is read from the model's input, so a champion trained at
    another resolution is scored on the same images.
    """
    import tensorflow as tf

    image_size = int(model.input_shape[1])
    dataset = image_dataset(records_path, image_size, batch_size, with_paths=True)
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)  # ~2x eager
    probabilities, labels, paths = [], [], []
    for images, batch_labels, batch_paths in dataset:
        probabilities.append(forward(images).numpy())
        labels.append(batch_labels.numpy())
        paths.extend(p.decode("utf-8") for p in batch_paths.numpy())
    if not probabilities:
        raise ValueError(f"{records_path}: no records to predict")
    return np.concatenate(probabilities), np.concatenate(labels), paths
