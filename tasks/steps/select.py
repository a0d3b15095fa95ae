"""Step 3b: rank the candidate backbones on validation accuracy; the winner continues.

Each candidate trained as its own mapped task and left its summary (or the
error that stopped it) under `candidates/<slug>/`. The ranking uses validation
accuracy only — the test split is never used to choose — and a tie goes to the
candidate that trained faster, then to the one listed first. A failed candidate
is listed with its error and the rest go on; when every candidate failed the
step fails with every reason. The leaderboard is written at the run level for
the report and the model card; TensorBoard shows the candidates side by side
when pointed at `<run root>/candidates/`.
"""
from __future__ import annotations

import logging
from typing import Any

from tasks import artifacts, phases, storage
from tasks.config import RunConfig, auto_image_size, planned_candidates
from tasks.errors import TrainingError
from tasks.redact import redact_text

log = logging.getLogger(__name__)


def select(cfg: RunConfig, trained: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Rank every planned candidate, write the leaderboard, return the winner (what later steps continue from).

    `trained` is what the mapped train tasks returned (a failed one returns
    nothing); the run root, not the list, says how each candidate ended.
    """
    manifest_uri = cfg.artifact(artifacts.MANIFEST)
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
    planned = planned_candidates(cfg, manifest)
    rows = [_row(cfg.for_candidate(candidate), order) for order, candidate in enumerate(planned)]
    finished = sorted((row for row in rows if row["val_accuracy"] is not None),
                      key=lambda row: (-row["val_accuracy"], row["seconds"], row["order"]))
    for rank, row in enumerate(finished, start=1):
        row["rank"] = rank
    failed = [row for row in rows if row["val_accuracy"] is None]
    if not finished:
        raise TrainingError("every candidate failed: " + "; ".join(f"{row['spec']}: {row['error']}" for row in failed)
                            + " — fix the named inputs and trigger again")
    winner = finished[0]
    reason = _reason(winner, finished[1:], failed)
    leaderboard_uri = cfg.artifact(artifacts.LEADERBOARD)
    board = {"winner": winner["candidate"], "reason": reason, "candidates": finished + failed}
    if cfg.image_size is None:  # image_size auto: the decision and why, for the report and the model card
        board["image_size_auto"] = auto_image_size(manifest)[1]
    storage.write_json(leaderboard_uri, board)
    log.info("select: %s (%d trained, %d failed; %d results handed over) -> %s", reason, len(finished), len(failed),
             sum(result is not None for result in trained), leaderboard_uri)
    winning = cfg.for_candidate(planned[winner["order"]])
    boundary_uri = winning.artifact(artifacts.BOUNDARY)  # left only when the winner's pass could (train.py)
    boundary = {"boundary_uri": boundary_uri} if storage.exists(boundary_uri) else {}
    return {key: winner[key] for key in ("candidate", "backbone", "image_size", "val_accuracy", "manifest_hash")} | {
        "reason": reason, "leaderboard_uri": leaderboard_uri,
        "model_uri": winning.artifact(artifacts.FEATURE_EXTRACTION_MODEL),
        "history_uri": winning.artifact(artifacts.HISTORY), "summary_uri": winning.artifact(artifacts.TRAIN_SUMMARY),
        **boundary}


def _row(cfg: RunConfig, order: int) -> dict[str, Any]:
    """How one candidate ended (read through the run root: a failed train task returns nothing): its best
    validation accuracy and time, or its error."""
    row = {"candidate": cfg.candidate, "spec": redact_text(f"{cfg.backbone}@{cfg.image_size}"),
           "backbone": cfg.backbone,
           "image_size": cfg.image_size, "order": order, "val_accuracy": None, "seconds": None, "error": None,
           "manifest_hash": None}
    summary_uri, error_uri = cfg.artifact(artifacts.TRAIN_SUMMARY), cfg.artifact(artifacts.TRAINING_ERROR)
    if storage.exists(summary_uri):
        summary = phases.read_summary(summary_uri)
        return {**row, "val_accuracy": float(summary.best_val_accuracy), "seconds": float(summary.seconds),
                "manifest_hash": summary.manifest_hash}
    if storage.exists(error_uri):
        return {**row, "error": phases.read_failure(error_uri)}
    return {**row, "error": f"no result at {summary_uri}: its train task did not finish"}


def _reason(winner: dict[str, Any], others: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    """Why the winner won, in words for the log, the report and the model card."""
    text = f"{winner['spec']} has the best validation accuracy, {winner['val_accuracy']:.4f}"
    if others:
        runner = others[0]
        gap = winner["val_accuracy"] - runner["val_accuracy"]
        text += (f" (next: {runner['spec']} at {runner['val_accuracy']:.4f}, "
                 + (f"{gap:+.4f})" if gap > 0 else "a tie, broken by training time)"))
    else:
        text += " (the only candidate that trained)"
    if failed:
        text += "; failed: " + ", ".join(row["spec"] for row in failed)
    return text
