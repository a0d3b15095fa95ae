"""Step 3: feature extraction — train a new head on a frozen pretrained backbone.

Without augmentation the frozen backbone would compute the same features every
epoch, so it runs exactly once per image: train and validation features are
computed in one streaming pass, stored under the run root (a retry reuses
them), and the head trains on them in about a second (tasks/head_training.py;
its functions are traced beside the pass). The same pass leaves fine-tuning's
boundary activations, which it computes on the way (`_with_boundary`). With augmentation every epoch
sees new images, so the backbone runs per epoch inside the model, through
Keras' fit on every device the worker has. Either way
the trained head is then composed with the backbone into one
image-in/probabilities-out model (`model/feature_extraction/`), whose URI the
step returns: select hands the winner's on to fine_tune and evaluate.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import keras

from tasks import activation_cache, artifacts, classifier, phases, registry, storage
from tasks.backbone_split import OUTPUT, Split, cut_backbone, split_backbone
from tasks.backbones import Backbone
from tasks.checkpoints import Stopping, fit_resumable
from tasks.config import Candidate, RunConfig, candidate_list
from tasks.head import augmentation, compose
from tasks.head_training import HeadEpochs, HeadSteps
from tasks.phases import FEATURE_EXTRACTION, PhaseSummary
from tasks.scratch import scratch_dir
from tasks.training import (
    MAX_STEPS_PER_EXECUTION,
    Feed,
    cached_splits,
    compile_model,
    distribution_strategy,
    fingerprint,
    image_data,
    resolve_loss,
    stage_records,
    strategy_for,
)
from tasks.warm_start import warm_start

log = logging.getLogger(__name__)


def train(cfg: RunConfig, data: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Feature extraction for one candidate backbone (a mapped task) on the subsample handed over (`data`).

    A failure is recorded where select looks for it (train/error.json), and the task still fails.
    """
    run = cfg.for_candidate(Candidate(**candidate))
    try:
        return {**_train(run, data), "candidate": run.candidate}
    except Exception as error:
        phases.write_failure(run.artifact(artifacts.TRAINING_ERROR), error)
        raise


def _train(cfg: RunConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Train the head, resuming from the last checkpoint; save the composed model, write history and summary."""
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    loss = resolve_loss(cfg.loss)
    manifest = artifacts.read_manifest(cfg, data)
    feed = Feed.of(cfg, len(manifest["classes"]))
    mixup = cfg.mixup if not cfg.augment else 0.0
    if mixup:  # blended labels need one-hot targets and a loss that takes them
        feed, loss = dataclasses.replace(feed, one_hot=True), keras.losses.CategoricalCrossentropy()
    spec = classifier.ClassifierSpec(cfg.backbone, cfg.image_size, tuple(manifest["classes"]), cfg.dropout)
    # a model on images trains on every device; a head on features (a fraction of a millisecond a batch) on one
    strategy = distribution_strategy() if cfg.augment else strategy_for([])
    with scratch_dir("train") as scratch, strategy.scope(), ThreadPoolExecutor(1) as beside:
        # the champion pointer is read beside the build and the extraction (an S3 client and a round trip)
        champion = beside.submit(registry.read_champion, cfg.publish_uri, cfg.model_name) if cfg.warm_start else None
        built = classifier.build(spec, cfg.backbone_weights, cfg.cache_dir)
        backbone, head = built.backbone, built.head
        backbone.model.trainable = False
        if cfg.augment:
            model = compose(backbone, head, augmentation(cfg.seed))
            epochs = image_data(feed, stage_records(cfg, scratch))
            compile_model(model, cfg.optimizer, loss, cfg.learning_rate, backbone, epochs.steps_per_epoch,
                          MAX_STEPS_PER_EXECUTION)
        else:
            model = head
            compile_model(model, cfg.optimizer, loss, cfg.learning_rate, backbone)
            steps = HeadSteps(head, loss, feed, mixup)
            traced = beside.submit(steps.trace)  # while the backbone computes the features
            whole = split_backbone(backbone, 0)  # the bottom is the whole frozen backbone: features
            bottom, boundary = _with_boundary(cfg, backbone, whole, manifest)
            cached = cached_splits(bottom, activation_cache.cache_key(backbone, whole, manifest["sha256"]),
                                   cfg.artifact(artifacts.FEATURES), scratch, lambda: stage_records(cfg, scratch),
                                   feed.batch_size, beside, boundary)  # the store fills while the head trains
            traced.result()
            epochs = HeadEpochs(steps, cached["train"], cached["val"])
        warm = "" if champion is None else warm_start(built, champion, cfg.publish_uri, cfg.model_name, scratch,
                                                      cfg.cache_dir)
        result = fit_resumable(model, phase=FEATURE_EXTRACTION, first_epoch=0, last_epoch=cfg.epochs, epochs=epochs,
                               stopping=Stopping(cfg.patience, cfg.min_delta),
                               fingerprint=fingerprint(cfg, backbone, manifest, FEATURE_EXTRACTION,
                                                       **({"mixup": mixup} if mixup else {})),
                               checkpoint_uri=cfg.artifact(artifacts.checkpoints(FEATURE_EXTRACTION)),
                               tensorboard_uri=cfg.artifact(artifacts.tensorboard(FEATURE_EXTRACTION)),
                               scratch=scratch)
        model_uri = cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL)
        classifier.upload(built, scratch, model_uri)
    seconds = round(time.monotonic() - started, 2)
    history_uri, summary_uri = cfg.artifact(artifacts.HISTORY), cfg.artifact(artifacts.TRAIN_SUMMARY)
    phases.write_history(history_uri, result.history)
    phases.write_summary(summary_uri, PhaseSummary(
        phase=FEATURE_EXTRACTION, backbone=backbone.name, weights_source=backbone.weights_source,
        feature_dim=backbone.feature_dim, manifest_hash=manifest["hash"], **result.record(seconds),
        settings={"augment": cfg.augment, "warm_start": warm, "mixup": mixup}))
    storage.delete(cfg.artifact(artifacts.TRAINING_ERROR))
    log.info("feature extraction: %s in %.1f s -> %s", result.describe(), seconds, model_uri)
    return {"model_uri": model_uri, "history_uri": history_uri, "summary_uri": summary_uri,
            "manifest_hash": manifest["hash"], "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "val_accuracy": result.best_val_accuracy, "stopped_early": result.stopped_early, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch}


def _with_boundary(cfg: RunConfig, backbone: Backbone, whole: Split, manifest: dict[str, Any]
                   ) -> tuple[keras.Model, tuple[dict[str, Any], str] | None]:
    """The model feature extraction's pass runs, and the (key, uri) of fine-tuning's boundary activations when it
    also leaves them (artifacts.BOUNDARY).

    The pass computes them on its way to the features, and fine-tuning would run
    the frozen bottom over the same images again (10-14 s on the demo): so when this
    run may fine-tune and trains this one backbone (with several candidates only the
    winner fine-tunes, and the others' would only fill the disk), the pass also
    returns the activations at fine-tuning's cut, cached under the key fine-tuning
    looks for. They are written only when every image went through the backbone
    (tasks.activation_cache.Companion); fine-tuning checks their key before it uses them.
    """
    if cfg.fine_tune == "never" or len(candidate_list(cfg)) > 1:
        return whole.bottom, None
    split = cut_backbone(backbone, cfg.fine_tune_layers)
    if split.cut == OUTPUT:  # fine-tuning cuts at the output: its activations are the features themselves
        return whole.bottom, None
    pixels = keras.Input(whole.bottom.input_shape[1:], name="pixels")
    boundary = split.bottom(pixels)
    bottom = keras.Model(pixels, [split.top(boundary), boundary], name="bottom_and_boundary")
    return bottom, (activation_cache.cache_key(backbone, split, manifest["sha256"]), cfg.artifact(artifacts.BOUNDARY))
