"""Step 3: feature extraction — train a new head on a frozen pretrained backbone.

Without augmentation the frozen backbone would compute the same features every
epoch, so it runs exactly once per image: train and validation features are
computed in one streaming pass, stored under the run root (a retry reuses
them), and the head trains on them in seconds. With augmentation every epoch
sees new images, so the backbone runs per epoch inside the model. Either way
the trained head is then composed with the backbone into one
image-in/probabilities-out model; that model (`model/feature_extraction/`)
is also the run's model until fine-tuning beats it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from tasks import artifacts, classifier, storage
from tasks.backbones import Backbone
from tasks.checkpoints import fit_resumable
from tasks.config import Candidate, RunConfig
from tasks.errors import TrainingError
from tasks.scratch import scratch_dir
from tasks.head import augmentation, compose
from tasks.records import image_dataset
from tasks.select import record_failure
from tasks.training import (FEATURE_EXTRACTION, TRAINING_SPLITS, compile_model, distribution_strategy, epoch_seed,
                            fingerprint, image_data, read_manifest, resolve_loss, stage_records, targets)

log = logging.getLogger(__name__)


def train_candidate(cfg: RunConfig, data: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Feature extraction for one candidate backbone (a mapped task); a failure is left for select to list."""
    run = cfg.for_candidate(Candidate(**candidate))
    try:
        return {**train(run, data), "candidate": run.candidate}
    except Exception as error:
        record_failure(run, error)
        raise


def train(cfg: RunConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Train the head on the split subsample handed over (`data`), resuming from the last checkpoint; save the
    composed model, write history and summary."""
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    loss = resolve_loss(cfg)
    manifest = read_manifest(cfg, data)
    num_classes = len(manifest["classes"])
    spec = classifier.ClassifierSpec(cfg.backbone, cfg.image_size, tuple(manifest["classes"]), cfg.dropout)
    strategy = distribution_strategy()
    with scratch_dir("train") as scratch, strategy.scope():
        built = classifier.build(spec, cfg.backbone_weights, cfg.cache_dir)
        backbone, head = built.backbone, built.head
        backbone.model.trainable = False
        if cfg.augment:
            model = compose(backbone, head, augmentation(cfg.seed))
            train_epoch, steps, validation = image_data(cfg, scratch, num_classes)
        else:
            model = head
            features = cached_features(cfg, backbone, manifest, scratch)
            train_epoch, steps = array_epochs(cfg, *features["train"], num_classes)
            validation = _array_dataset(*features["val"]).batch(cfg.batch_size).map(targets(cfg, num_classes))
        compile_model(model, cfg, loss, cfg.learning_rate, backbone)
        result = fit_resumable(model, cfg, phase=FEATURE_EXTRACTION, first_epoch=0, last_epoch=cfg.epochs,
                               train_epoch=train_epoch, steps_per_epoch=steps, validation=validation,
                               fingerprint=fingerprint(cfg, backbone, manifest, FEATURE_EXTRACTION), scratch=scratch)
        classifier.upload(built, scratch, cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL),
                          cfg.artifact(artifacts.MODEL))
    seconds = round(time.monotonic() - started, 2)
    storage.write_json(cfg.artifact(artifacts.HISTORY), {"epochs": result.history, "fine_tune_start_epoch": None})
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY), {
        "backbone": backbone.name, "weights_source": backbone.weights_source, "feature_dim": backbone.feature_dim,
        "kept": FEATURE_EXTRACTION, "manifest_hash": manifest["hash"],
        "phases": {FEATURE_EXTRACTION: {**result.record(seconds), "augment": cfg.augment}},
        "val_accuracy": {FEATURE_EXTRACTION: result.best_val_accuracy, "fine_tuned": None},
    })
    storage.delete(cfg.artifact(artifacts.TRAINING_ERROR))
    model_uri = cfg.artifact(artifacts.MODEL)
    log.info("feature extraction: %s in %.1f s -> %s", result.describe(), seconds, model_uri)
    return {"model_uri": model_uri, "history_uri": cfg.artifact(artifacts.HISTORY), "manifest_hash": manifest["hash"],
            "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy, "val_accuracy": result.best_val_accuracy,
            "stopped_early": result.stopped_early, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch}


def array_epochs(cfg: RunConfig, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[Callable, int]:
    """(epoch -> that epoch's shuffled batches of cached features, batches per epoch)."""
    examples = _array_dataset(x, y)

    def feature_epoch(epoch: int):
        return examples.shuffle(len(x), seed=epoch_seed(cfg, epoch)).batch(cfg.batch_size).map(
            targets(cfg, num_classes))

    return feature_epoch, math.ceil(len(x) / cfg.batch_size)


def _array_dataset(x: np.ndarray, y: np.ndarray):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y))


def extract_features(backbone: Backbone, splits: list[Path], image_size: int,
                     batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(features [n, ...], labels [n]) of every image of each split file, in file order.

    One streaming pass: each image goes through the backbone once, all splits
    through one traced function.
    """
    import tensorflow as tf

    embed = tf.function(lambda images: backbone.model(images, training=False),
                        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    extracted = []
    for records in splits:
        features, labels = [], []
        for images, batch_labels in image_dataset(records, image_size, batch_size):
            features.append(embed(images).numpy())
            labels.append(batch_labels.numpy())
        if not features:
            raise TrainingError(f"{records}: no images; rerun subsample so every split has images")
        extracted.append((np.concatenate(features), np.concatenate(labels)))
    return extracted


def cached_features(cfg: RunConfig, backbone: Backbone, manifest: dict[str, Any],
                    scratch: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and validation features from the run root, computed (once) if missing or made by another backbone."""
    key = {"backbone": cfg.backbone, "weights": backbone.weights_source, "image_size": cfg.image_size,
           "data": manifest["sha256"]}
    meta_uri = cfg.artifact(artifacts.FEATURES, "meta.json")
    uris = {split: cfg.artifact(artifacts.FEATURES, f"{split}.npz") for split in TRAINING_SPLITS}
    local = {split: scratch / "features" / f"{split}.npz" for split in TRAINING_SPLITS}
    reuse = storage.exists(meta_uri) and storage.read_json(meta_uri) == key
    started = time.monotonic()
    if reuse:
        for split in TRAINING_SPLITS:
            storage.download(uris[split], local[split])
    else:
        paths = [stage_records(cfg, split, scratch) for split in TRAINING_SPLITS]
        for split, (x, y) in zip(TRAINING_SPLITS, extract_features(backbone, paths, cfg.image_size, cfg.batch_size)):
            local[split].parent.mkdir(parents=True, exist_ok=True)
            np.savez(local[split], features=x, labels=y)
            storage.upload(local[split], uris[split])
        storage.write_json(meta_uri, key)
    features = {}
    for split in TRAINING_SPLITS:
        with np.load(local[split]) as stored:
            features[split] = (stored["features"], stored["labels"])
    log.info("%s features of %d train + %d val images (%s) in %.1f s -> %s",
             "reused" if reuse else "computed", len(features["train"][1]), len(features["val"][1]),
             backbone.name, time.monotonic() - started, cfg.artifact(artifacts.FEATURES))
    return features
