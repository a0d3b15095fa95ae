"""Step 7b: make the published version the champion when it may be promoted and, where asked, a human agreed.

Publishing is two steps so that a human can approve in between (Airflow's HITL operators):
tasks.steps.publish_version uploads and judges; `promote` moves the pointer (only for an eligible,
and where asked approved, candidate) and records the decision under promotions/ (tasks.registry).
The pointer is read back before the decision is recorded; a retry after a crash between pointer and
record writes the missing record.
"""
from __future__ import annotations

import logging

from tasks import artifacts, promotion, registry, storage
from tasks.approval import read_review, verdict
from tasks.config import RunConfig

log = logging.getLogger(__name__)

RESULT_KEYS = ("version", "version_uri", "promoted", "reason", "eligible", "new_accuracy", "champion_accuracy",
               "champion_version", "approval", "decision")


def promote(cfg: RunConfig, published: dict, approval: dict | None = None) -> dict:
    """Make the published version the champion when it is eligible and, if an approval was asked, approved.

    `published` is publish_version's result. `approval` is what Airflow's
    ApprovalOperator/HITLOperator returned (chosen_options, params_input with the
    reviewer's `comment`, responded_by_user, timedout), or None where the deployment
    asks for no approval; a timed-out request never approves. The decision is recorded
    under promotions/ with who approved or rejected and their comment. `promoted` is
    true only when this call moved the champion.
    """
    model_root = registry.model_root_of(cfg.publish_uri, cfg.model_name)
    recorded = registry.recorded_decision(model_root, published["version"])
    if recorded is not None:
        log.info("promote: decision for %s already recorded at %s; not deciding again", published["version"],
                 recorded["decision"])
        return _finish(cfg, recorded)
    review = read_review(approval)
    champion = registry.champion_at(model_root)
    if _unrecorded_promotion_of(model_root, champion, published["version"]):
        log.info("promote: the champion already is %s; recording the decision a crash left out", published["version"])
        decision = registry.record(model_root, {
            **promotion.decision_for(cfg, published, review, True, "the champion pointer already names this version (its "
                                                      "decision record was left out by a crash, written now)"),
            "decided_at": champion["promoted_at"], "decision": champion["decision"],
            "champion_version": None, "champion_decision": champion.get("replaces")})
    elif not published["eligible"]:
        decision = registry.record(model_root, promotion.decision_for(cfg, published, review, False, published["reason"]))
    elif review is not None and not review["approved"]:
        decision = registry.record(model_root, promotion.decision_for(cfg, published, review, False,
                                                 f"{published['reason']}; {verdict(review)}"))
    else:
        decision = promotion.move_champion(cfg, model_root, published, review)
    return _finish(cfg, decision)


def _unrecorded_promotion_of(model_root: str, champion: dict | None, version: str) -> bool:
    """The pointer names this version through a decision whose record is missing (a crash came in between)."""
    return (champion is not None and champion["version"] == version
            and not storage.exists(storage.join(model_root, champion["decision"])))


def _finish(cfg: RunConfig, decision: dict) -> dict:
    """The promote result from a recorded decision, also written to the run root's publish.json."""
    result = {key: decision.get(key) for key in RESULT_KEYS}
    log.info("promote: %s %s (%s)", result["version_uri"], "promoted" if result["promoted"] else "not promoted",
             result["reason"])
    storage.write_json(cfg.artifact(artifacts.PUBLISHED), result)
    return result


