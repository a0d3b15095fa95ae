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
import time
from typing import Any

import keras

from tasks import activation_cache, artifacts, classifier, storage
from tasks.backbone_split import split_backbone
from tasks.checkpoints import fit_resumable
from tasks.config import Candidate, RunConfig
from tasks.scratch import scratch_dir
from tasks.head import augmentation, compose
from tasks.steps.select import record_failure
from tasks.warm_start import warm_start
from tasks.training import (FEATURE_EXTRACTION, cached_data, compile_model, distribution_strategy, fingerprint,
                            image_data, read_manifest, resolve_loss)

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
        warm = warm_start(built, cfg.publish_uri, cfg.model_name, scratch, cfg.cache_dir) if cfg.warm_start else ""
        if cfg.augment:
            model = compose(backbone, head, augmentation(cfg.seed))
            train_epoch, steps, validation = image_data(cfg, scratch, num_classes)
        else:
            model = head
            whole = split_backbone(backbone, 0)  # the bottom is the whole frozen backbone: features
            train_epoch, steps, validation = cached_data(
                cfg, whole.bottom, activation_cache.cache_key(backbone, whole, manifest["sha256"]),
                cfg.artifact(artifacts.FEATURES), scratch, num_classes)
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
        "phases": {FEATURE_EXTRACTION: {**result.record(seconds), "augment": cfg.augment, "warm_start": warm}},
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
