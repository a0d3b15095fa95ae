"""Should a run fine-tune? A pure rule on the feature-extraction validation curve (step decide applies it).

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

import math
from typing import Any

from tasks.phases import FEATURE_EXTRACTION


def judge(epochs: list[dict[str, Any]], *, mode: str, patience: int, min_delta: float,
          target_accuracy: float | None, n_val: int | None = None) -> dict[str, Any]:
    """{fine_tune: bool, reason: str, ...} from a history's epochs and the rule's settings.

    `mode` is auto|always|never, `target_accuracy` None for no target; only
    feature-extraction epochs count. `n_val`, the number of validation images,
    sets the noise floor (None: no floor).
    """
    curve = [float(e["val_accuracy"]) for e in epochs if e.get("phase", FEATURE_EXTRACTION) == FEATURE_EXTRACTION]
    best = max(curve, default=None)
    noise = validation_noise(best, n_val)
    fine_tune, reason = _rule(curve, best, mode, patience, min_delta, target_accuracy, noise, n_val)
    return {"fine_tune": fine_tune, "reason": reason, "mode": mode, "patience": patience, "min_delta": min_delta,
            "target_accuracy": target_accuracy, "epochs": len(curve), "best_val_accuracy": best, "n_val": n_val,
            "noise": noise}


def validation_noise(accuracy: float | None, n_val: int | None) -> float:
    """One standard error of an accuracy measured on n_val images (0 when unknown)."""
    if accuracy is None or not n_val:
        return 0.0
    return math.sqrt(accuracy * (1 - accuracy) / n_val)


def _rule(curve: list[float], best: float | None, mode: str, patience: int, min_delta: float,
          target: float | None, noise: float, n_val: int | None) -> tuple[bool, str]:
    if mode == "never":
        return False, "fine_tune=never → skip fine-tuning"
    if mode == "always":
        return True, "fine_tune=always → fine-tune" + (f" (best val_accuracy {best:.3f})" if curve else "")
    if target is not None and best is not None and best >= target:
        return False, f"val_accuracy {best:.3f} ≥ target {target:g} → no fine-tune needed"
    if len(curve) <= patience:
        return False, (f"only {len(curve)} feature-extraction epoch(s), need more than patience={patience} to tell "
                       "a plateau → no fine-tune (run more epochs, or set fine_tune=always)")
    gain = max(curve[-patience:]) - max(curve[:-patience])
    threshold = max(min_delta, noise)
    why = (f"the noise of accuracy on {n_val} validation images, ±{noise:.3f}" if noise > min_delta
           else f"min_delta {min_delta:g}")
    where = f"at {best:.3f} < target {target:g}" if target is not None else f"at {best:.3f} (no target)"
    if gain <= threshold:
        return True, (f"val_accuracy improved {gain:.3f} over the last {patience} epochs (≤ {threshold:.3f}, "
                      f"{why}): plateau {where} → fine-tune")
    return False, (f"val_accuracy still improving: +{gain:.3f} over the last {patience} epochs (> {threshold:.3f}, "
                   f"{why}) {where} → no fine-tune: the head has not converged, so more feature-extraction epochs "
                   "are the cheaper gain and fine-tuning now would push large gradients into the pretrained layers "
                   "(raise epochs, or set fine_tune=always)")
