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
import tempfile
import time
from pathlib import Path
from typing import Any

import keras

from tasks import artifacts, storage
from tasks.backbones import load_backbone, set_trainable_top
from tasks.checkpoints import fit_resumable
from tasks.config import RunConfig
from tasks.head import HEAD_NAME, augmentation, compose
from tasks.train import (PHASE as FEATURE_EXTRACTION, TrainingError, compile_model, distribution_strategy,
                         fingerprint, image_data, read_manifest, resolve_loss, save_model)

log = logging.getLogger(__name__)

PHASE = "fine_tune"
KEPT_FINE_TUNED = "fine_tuned"
FEATURE_EXTRACTION_FILE = "feature_extraction.keras"  # the scratch copy of the phase-1 model


def fine_tune(cfg: RunConfig) -> dict[str, Any]:
    """Fine-tune (resuming from the last checkpoint), keep the better model, extend history and summary."""
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    loss = resolve_loss(cfg)
    manifest = read_manifest(cfg)
    num_classes = len(manifest["classes"])
    summary, history = _read_feature_extraction(cfg)
    before = float(summary["val_accuracy"][FEATURE_EXTRACTION])
    earlier = [entry for entry in history["epochs"] if entry["phase"] == FEATURE_EXTRACTION]
    start = len(earlier)
    learning_rate = cfg.learning_rate * cfg.fine_tune_lr_factor
    strategy = distribution_strategy()
    with tempfile.TemporaryDirectory(prefix="tlp-fine-tune-") as scratch_dir, strategy.scope():
        scratch = Path(scratch_dir)
        trained = keras.models.load_model(storage.download(cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL),
                                                           scratch / FEATURE_EXTRACTION_FILE), compile=False)
        backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
        backbone.model.set_weights(trained.get_layer(backbone.model.name).get_weights())
        head = trained.get_layer(HEAD_NAME)
        unfrozen = set_trainable_top(backbone, cfg.fine_tune_layers)
        model = compose(backbone, head, augmentation(cfg.seed) if cfg.augment else None)
        compile_model(model, cfg, loss, learning_rate, backbone)
        train_epoch, steps, validation = image_data(cfg, scratch, num_classes)
        result = fit_resumable(
            model, cfg, phase=PHASE, first_epoch=start, last_epoch=start + cfg.fine_tune_epochs,
            train_epoch=train_epoch, steps_per_epoch=steps, validation=validation, scratch=scratch,
            fingerprint=fingerprint(cfg, backbone, manifest, PHASE, start=start, before=before,
                                    fine_tune_layers=cfg.fine_tune_layers, fine_tune_lr_factor=cfg.fine_tune_lr_factor))
        after = result.best_val_accuracy
        kept = KEPT_FINE_TUNED if after > before else FEATURE_EXTRACTION
        _save_models(cfg, compose(backbone, head), kept, scratch)
    seconds = round(time.monotonic() - started, 2)
    storage.write_json(cfg.artifact(artifacts.HISTORY),
                       {"epochs": earlier + result.history, "fine_tune_start_epoch": start + 1})
    summary["kept"] = kept
    summary["val_accuracy"][KEPT_FINE_TUNED] = after
    summary["phases"][PHASE] = {**result.record(seconds), "learning_rate": learning_rate,
                                "unfrozen_layers": unfrozen}
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY), summary)
    model_uri = cfg.artifact(artifacts.MODEL)
    log.info("fine-tuning: %s in %.1f s, %d layers unfrozen, val_accuracy %.4f before -> kept %s -> %s",
             result.describe(), seconds, len(unfrozen), before, kept, model_uri)
    return {"model_uri": model_uri, "kept": kept, "val_accuracy_before": before, "val_accuracy_after": after,
            "epochs_run": len(result.history), "best_epoch": result.best_epoch, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch, "unfrozen_layers": unfrozen}


def _save_models(cfg: RunConfig, fine_tuned: keras.Model, kept: str, scratch: Path) -> None:
    """fine_tuned.keras always; model.keras becomes whichever model was kept (a rerun may flip it back)."""
    uris = [cfg.artifact(artifacts.FINE_TUNED_MODEL)]
    if kept == KEPT_FINE_TUNED:
        uris.append(cfg.artifact(artifacts.MODEL))
    save_model(fine_tuned, scratch, *uris)
    if kept == FEATURE_EXTRACTION:
        storage.upload(scratch / FEATURE_EXTRACTION_FILE, cfg.artifact(artifacts.MODEL))


def _read_feature_extraction(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train step's summary and history; fine-tuning needs both."""
    uris = [cfg.artifact(artifacts.TRAIN_SUMMARY), cfg.artifact(artifacts.HISTORY),
            cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL)]
    missing = [uri for uri in uris if not storage.exists(uri)]
    if missing:
        raise TrainingError(f"no feature-extraction result at {', '.join(missing)}; run the train step for run "
                            f"{cfg.run_id!r} first")
    return storage.read_json(uris[0]), storage.read_json(uris[1])
