"""Step 4: should this run fine-tune? A pure rule on the feature-extraction validation curve.

In `auto` mode, fine-tune exactly when the head has converged and is still
below `target_accuracy`. Converged means: validation accuracy gained no more
over the last `patience` epochs than the larger of `min_delta` and the
validation set's own sampling noise — one standard error of an accuracy p
measured on n images, sqrt(p(1 − p) / n). On 600 images at p ≈ 0.86 that is
±0.014, so a curve wobbling by ±0.01 reads as the plateau it is, while a curve
really rising by several points still does not fine-tune: more
feature-extraction epochs are the cheaper fix, and fine-tuning on top of an
unconverged head sends large gradients into the pretrained layers. With
`patience` or fewer epochs there is no plateau to see. The reason string says
which case applied and with what numbers, so the branch in the DAG explains itself.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from tasks import artifacts, storage
from tasks.config import RunConfig
from tasks.training import FEATURE_EXTRACTION

log = logging.getLogger(__name__)





def decide(history: list[dict[str, Any]] | dict[str, Any], cfg: RunConfig,
           n_val: int | None = None) -> dict[str, Any]:
    """{fine_tune: bool, reason: str, ...} from the history (history.json or its "epochs" list) and cfg's rule.

    Uses cfg.fine_tune (auto|always|never), cfg.patience, cfg.min_delta and
    cfg.target_accuracy (None = no target); only feature-extraction epochs count.
    `n_val`, the number of validation images, sets the noise floor (None: no floor).
    """
    epochs = history["epochs"] if isinstance(history, dict) else history
    curve = [float(e["val_accuracy"]) for e in epochs if e.get("phase", FEATURE_EXTRACTION) == FEATURE_EXTRACTION]
    best = max(curve, default=None)
    noise = validation_noise(best, n_val)
    fine_tune, reason = _rule(curve, best, cfg, noise, n_val)
    return {"fine_tune": fine_tune, "reason": reason, "mode": cfg.fine_tune, "patience": cfg.patience,
            "min_delta": cfg.min_delta, "target_accuracy": cfg.target_accuracy, "epochs": len(curve),
            "best_val_accuracy": best, "n_val": n_val, "noise": noise}


def validation_noise(accuracy: float | None, n_val: int | None) -> float:
    """One standard error of an accuracy measured on n_val images (0 when unknown)."""
    if accuracy is None or not n_val:
        return 0.0
    return math.sqrt(accuracy * (1 - accuracy) / n_val)


def _rule(curve: list[float], best: float | None, cfg: RunConfig, noise: float,
          n_val: int | None) -> tuple[bool, str]:
    if cfg.fine_tune == "never":
        return False, "fine_tune=never → skip fine-tuning"
    if cfg.fine_tune == "always":
        return True, "fine_tune=always → fine-tune" + (f" (best val_accuracy {best:.3f})" if curve else "")
    target = cfg.target_accuracy
    if target is not None and best is not None and best >= target:
        return False, f"val_accuracy {best:.3f} ≥ target {target:g} → no fine-tune needed"
    patience = cfg.patience
    if len(curve) <= patience:
        return False, (f"only {len(curve)} feature-extraction epoch(s), need more than patience={patience} to tell "
                       "a plateau → no fine-tune (run more epochs, or set fine_tune=always)")
    gain = max(curve[-patience:]) - max(curve[:-patience])
    threshold = max(cfg.min_delta, noise)
    why = (f"the noise of accuracy on {n_val} validation images, ±{noise:.3f}" if noise > cfg.min_delta
           else f"min_delta {cfg.min_delta:g}")
    where = f"at {best:.3f} < target {target:g}" if target is not None else f"at {best:.3f} (no target)"
    if gain <= threshold:
        return True, (f"val_accuracy improved {gain:.3f} over the last {patience} epochs (≤ {threshold:.3f}, "
                      f"{why}): plateau {where} → fine-tune")
    return False, (f"val_accuracy still improving: +{gain:.3f} over the last {patience} epochs (> {threshold:.3f}, "
                   f"{why}) {where} → no fine-tune: the head has not converged, so more feature-extraction epochs "
                   "are the cheaper gain and fine-tuning now would push large gradients into the pretrained layers "
                   "(raise epochs, or set fine_tune=always)")


def decide_step(cfg: RunConfig, trained: dict[str, Any]) -> dict[str, Any]:
    """Apply the rule to the history train handed over, write decision.json; returns the decision."""
    history_uri, manifest_uri = artifacts.require(cfg, artifacts.HISTORY, artifacts.MANIFEST)
    n_val = sum(storage.read_json(manifest_uri)["counts"]["val"].values())
    decision = decide(storage.read_json(trained.get("history_uri") or history_uri), cfg, n_val)
    storage.write_json(cfg.artifact(artifacts.DECISION), decision)
    log.info("decision: %s — %s -> %s", "fine-tune" if decision["fine_tune"] else "skip fine-tuning",
             decision["reason"], cfg.artifact(artifacts.DECISION))
    return decision
