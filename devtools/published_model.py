"""Publish a classifier without training it, laid out exactly as tasks/steps/publish.py publishes one.

Batch-scoring tests and bench/predict.py need a published version (model/, saved_model/, tflite/, metrics,
the report's per-test-image predictions, checksums.json) and a champion pointer, but not a trained model:
the backbone keeps its ImageNet weights and the head is seeded at random. Not pipeline code.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tasks import classifier, embedding_reference, pointer, serving_export, storage, tflite_export
from tasks.scratch import scratch_dir


def publish_untrained(publish_uri: str, model_name: str, classes: tuple[str, ...], image_size: int,
                      cache_dir: str, test_images: list[bytes], backbone: str = "efficientnet_lite0",
                      seed: int = 0, train_images: list[bytes] | None = None) -> dict:
    """Build, export and publish a version, make it the champion; returns the champion pointer.

    `test_images` (encoded) stand for the test split: the report's predictions.csv
    holds the model's top-1 confidence on each, as evaluate writes it. `train_images` (encoded) stand for
    the training sample whose embeddings publish keeps (tasks/embedding_reference.py); without them the
    version has no reference sample, as versions published before it.
    """
    import keras
    import pandas as pd

    from tasks import images
    from tasks.csv_cells import write_csv

    keras.utils.set_random_seed(seed)
    built = classifier.build(classifier.ClassifierSpec(backbone, image_size, tuple(classes), 0.2), "imagenet",
                             cache_dir)
    now = datetime.now(timezone.utc)
    suffix = hashlib.sha256(f"{backbone}@{image_size}/{seed}".encode()).hexdigest()[:12]
    version = f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{suffix}"
    version_uri = storage.join(publish_uri, model_name, "versions", version)
    with scratch_dir("publish-untrained") as scratch:
        stage = scratch / "version"
        classifier.save(built, stage / "model")
        serving_export.export(built.model, tuple(classes), stage / "saved_model")
        (stage / "tflite").mkdir()
        for variant in tflite_export.VARIANTS:
            (stage / "tflite" / f"{variant}.tflite").write_bytes(tflite_export.convert(stage / "saved_model", variant))
        (stage / "tflite" / tflite_export.SCORING_FILE).write_bytes(
            tflite_export.convert(stage / "saved_model", "float32", serving_export.EMBEDDINGS_SIGNATURE))
        if train_images:
            embedding_reference.write_sample(built.model, train_images, stage, {"split": "train", "seed": seed})
        pixels = np.stack([images.decode(data, image_size) for data in test_images])
        probabilities = np.asarray(built.model(pixels, training=False))
        (stage / "report").mkdir()
        write_csv(pd.DataFrame({"path": [f"test/{n}.png" for n in range(len(test_images))],
                                "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
                                "predicted_probability": probabilities.max(axis=1).astype(np.float64)}),
                  stage / "report" / "predictions.csv")
        (stage / "metrics.json").write_text(json.dumps({"accuracy": 0.0, "classes": list(classes),
                                                        "n_test": len(test_images)}))
        checksums = {path.relative_to(stage).as_posix(): storage.sha256_file(path)
                     for path in sorted(stage.rglob("*")) if path.is_file()}
        storage.upload(stage, version_uri)
        storage.write_json(storage.join(version_uri, "checksums.json"), checksums)
    champion = {"version": version, "uri": version_uri, "accuracy": 0.0, "metric": "accuracy",
                "classes": list(classes), "run_id": "untrained", "promoted_at": now.isoformat(),
                "decision": f"promotions/untrained-{version}.json", "replaces": None,
                "model_uri": storage.join(version_uri, "model"),
                "saved_model_uri": storage.join(version_uri, "saved_model")}
    champion_uri = storage.join(publish_uri, model_name, "champion.json")
    if not pointer.write_if(champion_uri, champion, pointer.read(champion_uri)[1]):
        raise RuntimeError(f"{champion_uri} moved while publishing {version}")
    return champion


def keras_probabilities(version_uri: str, encoded: list[bytes], cache_dir: str, scratch: Path) -> np.ndarray:
    """What the published Keras classifier answers for these images, decoded by the project's decoder."""
    from tasks import images

    model = classifier.fetch(storage.join(version_uri, "model"), scratch, cache_dir)
    size = model.spec.image_size
    return np.asarray(model.model(np.stack([images.decode(data, size) for data in encoded]), training=False))
