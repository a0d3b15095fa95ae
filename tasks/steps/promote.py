"""Step 7b: make a published version the champion when it may be promoted and, where asked, a human agreed.

Publishing is two steps so that a human can approve in between (Airflow's HITL operators):
tasks.steps.publish_version uploads, judges and records its judgement in the store; `promote` takes
only the version id and trusts nothing else it is handed. It recomputes the version's location under
the model root (a publish location of the deployment: settings), verifies the version against its
checksums.json, reads eligibility and scores from the judgement publish_version recorded (for this
run), and, where the deployment asks for approval of this model (TLP_APPROVAL_MODELS), the answer
recorded from Airflow's own HITL record: no fresh Approve by one of the deployment's approvers, other
than the user who triggered the run, means no promotion, with the reason recorded. The pointer is read
back before the decision is recorded; a retry after a crash between pointer and record writes the
missing record.
"""
from __future__ import annotations

import logging

from tasks import approval, artifacts, data_changes, promotion, registry, settings, storage
from tasks.config import RunConfig, check_publish_location
from tasks.registry import SAVED_MODEL_DIR, TEST_RECORDS
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

RESULT_KEYS = ("version", "version_uri", "promoted", "reason", "eligible", "new_accuracy", "champion_accuracy",
               "champion_version", "gain", "gain_interval", "p_value", "n_test", "paired_test", "judged_on", "approval",
               "decision")


def promote(cfg: RunConfig, version: str, triggered_by: str | None = None) -> dict:
    """Make `version` (publish_version's id, of this run) the champion when its recorded judgement says it may
    and, where approval is required, an approver approved it. `triggered_by` is the user who triggered the run
    (from Airflow's own DAG run record): that user's answer never approves.

    The decision is recorded under promotions/ with the judgement, the paired test and the review.
    `promoted` is true only when this call moved the champion.
    """
    version = registry.check_version_id(version)
    deployment = settings.load()
    check_publish_location(cfg, deployment.readable_publish_locations())
    model_root = registry.model_root_of(cfg.publish_uri, cfg.model_name)
    version_uri = registry.version_uri_of(model_root, version)
    recorded = registry.recorded_decision(model_root, version)
    if recorded is not None:
        log.info("promote: decision for %s already recorded at %s; not deciding again", version, recorded["decision"])
        return _finish(cfg, recorded)
    judgement = registry.judgement_of_run(model_root, version, cfg.run_id, cfg.dag_id)
    registry.verify_version(version_uri)
    review = None
    if deployment.approval_required(cfg.publish_uri, cfg.model_name):
        review = approval.review(registry.read_approval(model_root, version), version=version,
                                 judged_at=judgement["judged_at"], triggered_by=triggered_by,
                                 approvers=deployment.approvers)
    if review is None:  # where a human approves, the approval request shows the shift instead
        judgement = data_changes.held(judgement, _recorded_changes(cfg), deployment.shift_auc_threshold)
    champion = registry.champion_at(model_root)
    if _unrecorded_promotion_of(model_root, champion, version):
        log.info("promote: the champion already is %s; recording the decision a crash left out", version)
        decision = registry.record(model_root, {
            **promotion.decision_for(judgement, review, True, "the champion pointer already names this version (its "
                                                              "decision record was left out by a crash, written now)"),
            "decided_at": champion["promoted_at"], "decision": champion["decision"],
            "champion_version": None, "champion_decision": champion.get("replaces")})
    elif not judgement["eligible"]:
        decision = registry.record(model_root, promotion.decision_for(judgement, review, False, judgement["reason"]))
    elif review is not None and not review["approved"]:
        decision = registry.record(model_root, promotion.decision_for(
            judgement, review, False, f"{judgement['reason']}; {approval.verdict(review)}"))
    else:
        decision = promotion.move_champion(model_root, judgement, review,
                                           lambda moved: _judge_again(cfg, judgement, moved))
    return _finish(cfg, decision)


def _recorded_changes(cfg: RunConfig) -> dict | None:
    """What check_changes found since the champion (None when it did not run)."""
    uri = cfg.artifact(artifacts.CHANGES)
    return storage.read_json(uri) if storage.exists(uri) else None


def _judge_again(cfg: RunConfig, judgement: dict, champion: dict | None) -> dict:
    """The rule against a champion that arrived after publish_version judged, on the version's own test split."""
    with scratch_dir("promote") as scratch:
        test_records = storage.download(storage.join(judgement["version_uri"], TEST_RECORDS), scratch / "test.tfrecord")
        judged, _ = promotion.judge(champion, judgement["classes"],
                                    storage.join(judgement["version_uri"], SAVED_MODEL_DIR),
                                    promotion.recorded_predictions(judgement["version_uri"]), test_records,
                                    settings.load().evaluation_set(cfg.model_name), cfg.batch_size, scratch)
    return judged


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
