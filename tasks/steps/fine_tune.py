"""Step 5: fine-tune the top of the backbone together with the trained head.

Starts from exactly the model feature extraction saved (backbone and head
weights) and cuts the backbone on a clean block boundary near the top
`fine_tune_layers` units (tasks/backbone_split.py; the log says where it cut).
Everything below the cut stays frozen and BatchNorm runs in inference mode,
so without augmentation the bottom maps each image to the same activations
every epoch: they are computed once per image, kept under the run root (a retry
reuses them) and streamed back in each epoch's image order, and the epochs
train only the top and the head — the same updates as on images, for a fraction
of the cost. With augmentation every epoch sees new images, so the whole
composed model trains on them. The learning rate is learning_rate ×
fine_tune_lr_factor, constant or decayed to zero on a cosine over the
fine-tune epochs; the epoch count continues so the history is one curve. The
fine-tuned model replaces the run's model only if it beats feature extraction
on validation accuracy.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import keras

from tasks import activation_cache, artifacts, classifier, storage
from tasks.backbone_split import split_backbone
from tasks.checkpoints import fit_resumable
from tasks.config import RunConfig
from tasks.head import augmentation, compose
from tasks.scratch import scratch_dir
from tasks.training import (FEATURE_EXTRACTION, FINE_TUNE, cached_data, compile_model, distribution_strategy,
                            fingerprint, image_data, read_manifest, resolve_loss)

log = logging.getLogger(__name__)

KEPT_FINE_TUNED = "fine_tuned"
WARMUP_SHARE = 0.15  # the most of a fine-tune its warm-up may take (a 7-epoch default still warms up one epoch)


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
    strategy = distribution_strategy()
    with scratch_dir("fine-tune") as scratch, strategy.scope():
        feature_extracted = storage.download(cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL) + "/",
                                             scratch / FEATURE_EXTRACTION)
        built = classifier.load(feature_extracted, cfg.cache_dir)
        backbone, head = built.backbone, built.head
        split = split_backbone(backbone, cfg.fine_tune_layers)
        if cfg.augment:
            model = compose(backbone, head, augmentation(cfg.seed))
            train_epoch, steps, validation = image_data(cfg, scratch, num_classes)
        else:
            model = _top_and_head(split.top, head)
            train_epoch, steps, validation = cached_data(
                cfg, split.bottom, activation_cache.cache_key(backbone, split, manifest["sha256"]),
                cfg.artifact(artifacts.ACTIVATIONS, split.cut), scratch, num_classes)
        compile_model(model, cfg, loss, learning_rate(cfg, steps), backbone)
        result = fit_resumable(
            model, cfg, phase=FINE_TUNE, first_epoch=start, last_epoch=start + cfg.fine_tune_epochs,
            train_epoch=train_epoch, steps_per_epoch=steps, validation=validation, scratch=scratch,
            fingerprint=fingerprint(cfg, backbone, manifest, FINE_TUNE, start=start, before=before, cut=split.cut,
                                    fine_tune_lr_factor=cfg.fine_tune_lr_factor,
                                    fine_tune_schedule=cfg.fine_tune_schedule))
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
    summary["phases"][FINE_TUNE] = {**result.record(seconds), "learning_rate": cfg.learning_rate
                                    * cfg.fine_tune_lr_factor, "schedule": cfg.fine_tune_schedule,
                                    "cut": split.cut, "on": "images" if cfg.augment else "cached activations",
                                    "unfrozen_layers": split.unfrozen}
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY), summary)
    model_uri = cfg.artifact(artifacts.MODEL)
    log.info("fine-tuning: %s in %.1f s, cut before %s (%d units unfrozen), val_accuracy %.4f before -> kept %s -> %s",
             result.describe(), seconds, split.cut, split.units, before, kept, model_uri)
    return {"model_uri": model_uri, "kept": kept, "val_accuracy_before": before, "val_accuracy_after": after,
            "epochs_run": len(result.history), "best_epoch": result.best_epoch, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch, "cut": split.cut, "unfrozen_layers": split.unfrozen}


def learning_rate(cfg: RunConfig, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """learning_rate × fine_tune_lr_factor, constant, or warmed up linearly and then cosine-decayed to 0.

    The warm-up keeps the first updates of freshly unfrozen layers small (at the
    full rate from step one the head's accuracy collapses for an epoch). It lasts
    one epoch, but never more than WARMUP_SHARE of the fine-tune: a short fine-tune
    (one or two epochs) would otherwise spend all or half of itself climbing to the
    full rate and none of it settling. The schedule reads the optimizer's step count,
    which a checkpoint restores, so a resumed run continues the same curve.
    """
    rate = cfg.learning_rate * cfg.fine_tune_lr_factor
    if cfg.fine_tune_schedule == "constant":
        return rate
    total = cfg.fine_tune_epochs * steps_per_epoch
    warmup = warmup_steps(total, steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else rate, decay_steps=max(1, total - warmup),
        warmup_target=rate if warmup else None, warmup_steps=warmup)


def warmup_steps(total_steps: int, steps_per_epoch: int) -> int:
    """Warm-up length: one epoch, at most WARMUP_SHARE of all fine-tune steps (rounded up), and never all of them."""
    return max(0, min(steps_per_epoch, math.ceil(total_steps * WARMUP_SHARE), total_steps - 1))


def _top_and_head(top: keras.Model, head: keras.Model) -> keras.Model:
    """Boundary activations in, class probabilities out; the top (sharing the backbone's layers) in inference mode."""
    inputs = keras.Input(top.input_shape[1:], name="activations")
    return keras.Model(inputs, head(top(inputs, training=False)), name="top_and_head")


def _read_feature_extraction(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train step's summary and history; fine-tuning needs both."""
    summary, history, _ = artifacts.require(cfg, artifacts.TRAIN_SUMMARY, artifacts.HISTORY,
                                            artifacts.FEATURE_EXTRACTION_MODEL)
    return storage.read_json(summary), storage.read_json(history)
