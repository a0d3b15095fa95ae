"""Step 5: fine-tune the top of the backbone together with the trained head.

Starts from exactly the model feature extraction saved (backbone and head
weights), which select hands over, and cuts the backbone on a clean block
boundary near the top `fine_tune_layers` units (tasks/backbone_split.py; the log
says where it cut). Everything below the cut stays frozen and BatchNorm runs in
inference mode, so without augmentation the bottom maps each image to the same
activations every epoch: they are computed once per image — usually by feature
extraction's pass, which leaves them on its way to the features (select hands
them over; used when made for this cut, bottom and data), else here, kept under
the run root (a retry reuses them) — and gathered in each epoch's image order, and
the epochs train only the top and the head — the same updates as on images,
for a fraction of the cost — in the own loop on cached rows
(tasks/head_training.py), traced while the activations are computed. The
top's depthwise kernels stay frozen when `fine_tune_depthwise` says so (auto:
when the images are upsampled to the input, where freezing them spares a
third of a step for the same accuracy; tasks.config.depthwise_trained).
With augmentation every epoch sees new images, so
the whole composed model trains on them. The learning rate is learning_rate ×
fine_tune_lr_factor, constant or decayed to zero on a cosine over the fine-tune
epochs; the epoch count continues so both phases' histories make one curve.
With `warm_start_fine_tune`, a champion fine-tuned above the same frozen bottom lends
its fine-tuned top and head instead (tasks.warm_start.champion_top; the
bottom, and so the cached activations, stay the ImageNet ones).
The fine-tuned model is saved as its own artifact (`model/fine_tuned/`) and
returned; evaluate keeps whichever phase scored better on validation.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import keras

from tasks import activation_cache, artifacts, classifier, phases
from tasks.activation_cache import CachedSplit
from tasks.backbone_split import split_backbone
from tasks.checkpoints import Epochs, Stopping, fit_resumable
from tasks.config import RunConfig, depthwise_trained
from tasks.head import augmentation, compose
from tasks.head_training import HeadEpochs, HeadSteps
from tasks.phases import FINE_TUNE, PhaseSummary
from tasks.scratch import scratch_dir
from tasks.training import (
    MAX_STEPS_PER_EXECUTION,
    Feed,
    cached_epochs,
    cached_splits,
    compile_model,
    distribution_strategy,
    fingerprint,
    image_data,
    open_cached,
    resolve_loss,
    stage_records,
)
from tasks.warm_start import warm_start_top

log = logging.getLogger(__name__)

WARMUP_SHARE = 0.15  # the most of a fine-tune its warm-up may take (a 7-epoch default still warms up one epoch)


def fine_tune(cfg: RunConfig, data: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the model select handed over (`best`) on the subsample handed over (`data`), resuming from the
    last checkpoint; save the fine-tuned model, its history and summary."""
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    loss = resolve_loss(cfg.loss)
    manifest = artifacts.read_manifest(cfg, data)
    feed = Feed.of(cfg, len(manifest["classes"]))
    model_uri = artifacts.arrived(cfg, best.get("model_uri"), artifacts.FEATURE_EXTRACTION_MODEL)
    before = phases.read_summary(artifacts.arrived(cfg, best.get("summary_uri"), artifacts.TRAIN_SUMMARY))
    start = len(phases.read_history(artifacts.arrived(cfg, best.get("history_uri"), artifacts.HISTORY)))
    depthwise, why = depthwise_trained(cfg.fine_tune_depthwise, manifest, cfg.image_size)
    log.info("fine-tuning: %s", why)
    strategy = distribution_strategy()
    with scratch_dir("fine-tune") as scratch, strategy.scope():
        built = classifier.fetch(model_uri, scratch, cfg.cache_dir)
        backbone, head = built.backbone, built.head
        split = split_backbone(backbone, cfg.fine_tune_layers, depthwise)
        warm = warm_start_top(built, split, cfg.fine_tune_layers, cfg.publish_uri, cfg.model_name, scratch,
                              cfg.cache_dir) if cfg.warm_start_fine_tune else ""
        if cfg.augment:
            model = compose(backbone, head, augmentation(cfg.seed))
            images = image_data(feed, stage_records(cfg, scratch))
            steps_per_epoch = images.steps_per_epoch
        else:
            model = _top_and_head(split.top, head)
            steps_per_epoch = feed.batches(sum(manifest["counts"]["train"].values()))
        rate = learning_rate(cfg.learning_rate * cfg.fine_tune_lr_factor, cfg.fine_tune_schedule,
                             cfg.fine_tune_epochs, steps_per_epoch)
        compile_model(model, cfg.optimizer, loss, rate, backbone, steps_per_epoch)
        key = activation_cache.cache_key(backbone, split, manifest["sha256"])
        epochs = images if cfg.augment else _on_activations(
            model, loss, feed, strategy, lambda: _handed_boundary(cfg, best, key, scratch) or cached_splits(
                split.bottom, key, cfg.artifact(artifacts.ACTIVATIONS, split.cut), scratch,
                lambda: stage_records(cfg, scratch), feed.batch_size))
        result = fit_resumable(
            model, phase=FINE_TUNE, first_epoch=start, last_epoch=start + cfg.fine_tune_epochs, epochs=epochs,
            stopping=Stopping(cfg.patience, cfg.min_delta), scratch=scratch,
            checkpoint_uri=cfg.artifact(artifacts.checkpoints(FINE_TUNE)),
            tensorboard_uri=cfg.artifact(artifacts.tensorboard(FINE_TUNE)),
            fingerprint=fingerprint(cfg, backbone, manifest, FINE_TUNE, start=start,
                                    before=before.best_val_accuracy, cut=split.cut,
                                    fine_tune_lr_factor=cfg.fine_tune_lr_factor, depthwise=depthwise,
                                    fine_tune_schedule=cfg.fine_tune_schedule, warm_start=warm))
        tuned_uri = cfg.artifact(artifacts.FINE_TUNED_MODEL)
        classifier.upload(built, scratch, tuned_uri)
    seconds = round(time.monotonic() - started, 2)
    history_uri, summary_uri = cfg.artifact(artifacts.FINE_TUNE_HISTORY), cfg.artifact(artifacts.FINE_TUNE_SUMMARY)
    phases.write_history(history_uri, result.history)
    phases.write_summary(summary_uri, PhaseSummary(
        phase=FINE_TUNE, backbone=before.backbone, weights_source=before.weights_source,
        feature_dim=before.feature_dim, manifest_hash=manifest["hash"], **result.record(seconds),
        settings={"augment": cfg.augment, "learning_rate": cfg.learning_rate * cfg.fine_tune_lr_factor,
                  "schedule": cfg.fine_tune_schedule, "cut": split.cut,
                  "on": "images" if cfg.augment else "cached activations", "fine_tune_layers": split.unfrozen,
                  "depthwise": "trained" if depthwise else "frozen", "depthwise_reason": why,
                  "warm_start": warm}))
    log.info("fine-tuning: %s in %.1f s, cut before %s (%d units above it, %d trained: depthwise kernels %s), "
             "val_accuracy %.4f before -> %.4f -> %s", result.describe(), seconds, split.cut, split.units,
             len(split.unfrozen), "trained" if depthwise else "frozen", before.best_val_accuracy,
             result.best_val_accuracy, tuned_uri)
    return {"model_uri": tuned_uri, "history_uri": history_uri, "summary_uri": summary_uri,
            "val_accuracy": result.best_val_accuracy, "val_accuracy_before": before.best_val_accuracy,
            "epochs_run": len(result.history), "best_epoch": result.best_epoch, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch, "cut": split.cut, "fine_tune_layers": split.unfrozen}


def learning_rate(rate: float, schedule: str, epochs: int,
                  steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`rate` (learning_rate × fine_tune_lr_factor), constant, or warmed up linearly and then cosine-decayed to 0
    over `epochs`.

    The warm-up keeps the first updates of freshly unfrozen layers small (at the
    full rate from step one the head's accuracy collapses for an epoch). It lasts
    one epoch, but never more than WARMUP_SHARE of the fine-tune: a short fine-tune
    (one or two epochs) would otherwise spend all or half of itself climbing to the
    full rate and none of it settling. The schedule reads the optimizer's step count,
    which a checkpoint restores, so a resumed run continues the same curve.
    """
    if schedule == "constant":
        return rate
    total = epochs * steps_per_epoch
    warmup = warmup_steps(total, steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else rate, decay_steps=max(1, total - warmup),
        warmup_target=rate if warmup else None, warmup_steps=warmup)


def warmup_steps(total_steps: int, steps_per_epoch: int) -> int:
    """Warm-up length: one epoch, at most WARMUP_SHARE of all fine-tune steps (rounded up), and never all of them."""
    return max(0, min(steps_per_epoch, math.ceil(total_steps * WARMUP_SHARE), total_steps - 1))


def _on_activations(model: keras.Model, loss, feed: Feed, strategy,
                    cache: Callable[[], dict[str, CachedSplit]]) -> Epochs:
    """The epochs of `model` (compiled: top and head) over the cut's boundary activations, which `cache` computes or
    reuses. On one device they run in the own loop on cached rows (tasks/head_training.py), whose functions are
    traced and optimised on a side thread while the bottom computes the activations: about ten seconds that
    Keras' fit spent in its first epoch. Over several devices Keras' fit spreads each batch across them."""
    if strategy.num_replicas_in_sync > 1:
        return cached_epochs(feed, cache())
    steps = HeadSteps(model, loss, feed, 0.0, MAX_STEPS_PER_EXECUTION)
    with ThreadPoolExecutor(1) as beside:
        traced = beside.submit(steps.trace)
        cached = cache()
        traced.result()
    return HeadEpochs(steps, cached["train"], cached["val"])


def _handed_boundary(cfg: RunConfig, best: dict[str, Any], key: dict[str, Any],
                     scratch: Path) -> dict[str, CachedSplit] | None:
    """The boundary activations feature extraction's pass left (tasks/steps/train.py; select hands them over), when
    they were made under this fine-tune's key (the same bottom weights, cut, images and decoder); else None and the
    bottom runs here."""
    if "boundary_uri" not in best:
        return None
    uri = artifacts.arrived(cfg, best["boundary_uri"], artifacts.BOUNDARY)
    cached = open_cached(uri, key, scratch)
    log.info("fine-tuning: %s", f"the boundary activations feature extraction left at {uri}" if cached else
             f"no boundary activations at {uri} for this cut, model and data (or unfinished); computing them")
    return cached


def _top_and_head(top: keras.Model, head: keras.Model) -> keras.Model:
    """Boundary activations in, class probabilities out; the top (sharing the backbone's layers) in inference mode."""
    inputs = keras.Input(top.input_shape[1:], name="activations")
    return keras.Model(inputs, head(top(inputs, training=False)), name="top_and_head")

