"""Step 4: should this run fine-tune? The plateau rule (tasks/plateau.py) on the winner's feature-extraction
curve; the decision and its reason go to decision.json and label the DAG's branch.
"""
from __future__ import annotations

import logging
from typing import Any

from tasks import artifacts, phases, plateau, storage
from tasks.config import RunConfig

log = logging.getLogger(__name__)


def decide(cfg: RunConfig, data: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """Apply the rule to the history select handed over (`best`), with the validation size of the subsample
    handed over (`data`); write decision.json and return the decision."""
    history_uri = artifacts.arrived(cfg, best.get("history_uri"), artifacts.HISTORY)
    n_val = sum(artifacts.read_manifest(cfg, data)["counts"]["val"].values())
    decision = plateau.judge(phases.read_history(history_uri), mode=cfg.fine_tune, patience=cfg.patience,
                             min_delta=cfg.min_delta, target_accuracy=cfg.target_accuracy, n_val=n_val)
    storage.write_json(cfg.artifact(artifacts.DECISION), decision)
    log.info("decision: %s — %s -> %s", "fine-tune" if decision["fine_tune"] else "skip fine-tuning",
             decision["reason"], cfg.artifact(artifacts.DECISION))
    return decision
