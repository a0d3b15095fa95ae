"""Step 5: fine-tune the top of the backbone together with the trained head.

Starts from exactly the model feature extraction saved (backbone and head
weights), unfreezes the top `fine_tune_layers` units (BatchNorm stays frozen
and the backbone runs with training=False, so its ImageNet statistics survive a
small dataset), trains at learning_rate × fine_tune_lr_factor, and continues the
epoch count so the history is one curve. The fine-tuned model replaces the
run's model only if it beats feature extraction on validation accuracy.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import keras

from tasks import artifacts, classifier, storage
from tasks.backbones import set_trainable_top
from tasks.checkpoints import fit_resumable
from tasks.config import RunConfig
from tasks.head import augmentation, compose
from tasks.scratch import scratch_dir
from tasks.training import (FEATURE_EXTRACTION, FINE_TUNE, compile_model, distribution_strategy, fingerprint,
                            image_data, read_manifest, resolve_loss)

log = logging.getLogger(__name__)

KEPT_FINE_TUNED = "fine_tuned"


def fine_tune(cfg: RunConfig, trained: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the model train handed over (resuming from the last checkpoint), keep the better model,
    extend history and summary."""
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    loss = resolve_loss(cfg)
    manifest = read_manifest(cfg, {"hash": trained.get("manifest_hash")})
    num_classes = len(manifest["classes"])
    summary, history = _read_feature_extraction(cfg)
    before = float(summary["val_accuracy"][FEATURE_EXTRACTION])
    earlier = [entry for entry in history["epochs"] if entry["phase"] == FEATURE_EXTRACTION]
    start = len(earlier)
    learning_rate = cfg.learning_rate * cfg.fine_tune_lr_factor
    strategy = distribution_strategy()
    with scratch_dir("fine-tune") as scratch, strategy.scope():
        feature_extracted = storage.download(cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL) + "/",
                                             scratch / FEATURE_EXTRACTION)
        built = classifier.load(feature_extracted, cfg.cache_dir)
        backbone, head = built.backbone, built.head
        unfrozen = set_trainable_top(backbone, cfg.fine_tune_layers)
        model = compose(backbone, head, augmentation(cfg.seed) if cfg.augment else None)
        compile_model(model, cfg, loss, learning_rate, backbone)
        train_epoch, steps, validation = image_data(cfg, scratch, num_classes)
        result = fit_resumable(
            model, cfg, phase=FINE_TUNE, first_epoch=start, last_epoch=start + cfg.fine_tune_epochs,
            train_epoch=train_epoch, steps_per_epoch=steps, validation=validation, scratch=scratch,
            fingerprint=fingerprint(cfg, backbone, manifest, FINE_TUNE, start=start, before=before,
                                    fine_tune_layers=cfg.fine_tune_layers, fine_tune_lr_factor=cfg.fine_tune_lr_factor))
        after = result.best_val_accuracy
        kept = KEPT_FINE_TUNED if after > before else FEATURE_EXTRACTION
        classifier.upload(built, scratch, cfg.artifact(artifacts.FINE_TUNED_MODEL))
        kept_model = cfg.artifact(artifacts.FINE_TUNED_MODEL if kept == KEPT_FINE_TUNED
                                  else artifacts.FEATURE_EXTRACTION_MODEL)
        storage.delete(cfg.artifact(artifacts.MODEL) + "/")
        storage.upload(storage.download(kept_model + "/", scratch / "kept"), cfg.artifact(artifacts.MODEL))
    seconds = round(time.monotonic() - started, 2)
    storage.write_json(cfg.artifact(artifacts.HISTORY),
                       {"epochs": earlier + result.history, "fine_tune_start_epoch": start + 1})
    summary["kept"] = kept
    summary["val_accuracy"][KEPT_FINE_TUNED] = after
    summary["phases"][FINE_TUNE] = {**result.record(seconds), "learning_rate": learning_rate,
                                    "unfrozen_layers": unfrozen}
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY), summary)
    model_uri = cfg.artifact(artifacts.MODEL)
    log.info("fine-tuning: %s in %.1f s, %d layers unfrozen, val_accuracy %.4f before -> kept %s -> %s",
             result.describe(), seconds, len(unfrozen), before, kept, model_uri)
    return {"model_uri": model_uri, "kept": kept, "val_accuracy_before": before, "val_accuracy_after": after,
            "epochs_run": len(result.history), "best_epoch": result.best_epoch, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch, "unfrozen_layers": unfrozen}


def _read_feature_extraction(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train step's summary and history; fine-tuning needs both."""
    summary, history, _ = artifacts.require(cfg, artifacts.TRAIN_SUMMARY, artifacts.HISTORY,
                                            artifacts.FEATURE_EXTRACTION_MODEL)
    return storage.read_json(summary), storage.read_json(history)
