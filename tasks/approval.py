"""Human approval before a promotion: what the approver reads, the answers offered, and what an answer means.

Approval is per model (settings.approval_required: TLP_APPROVAL_MODELS), given only by the deployment's
approvers (TLP_APPROVERS, assigned to Airflow's HITL request), never by the user who triggered the run.
The DAG's approval task reads the answer from Airflow's own HITL record (the event Airflow resumes the
task with, not XCom) and records it in the store with `answer_from_hitl`; promote reads that record and
judges it with `review`. No answer before the timeout selects the default, Reject, and is recorded as
expired. Kept free of heavy imports: the DAG file builds the HITL operator from these names at parse time.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from tasks import artifacts

APPROVE, REJECT = "Approve", "Reject"
OPTIONS = [APPROVE, REJECT]
COMMENT = "comment"
REPORT_PAGE = "/ml-reports/runs/{dag_id}/{run_id}/" + artifacts.REPORT.path + "/"  # plugins/ml_reports.py serves it


def report_page(published: dict) -> str:
    """The candidate's report in the Airflow UI (the plugin's run view), relative to the Airflow base URL."""
    return REPORT_PAGE.format(dag_id=published["dag_id"], run_id=quote(published["run_id"], safe=""))


def approval_request(judgement: dict) -> dict[str, str]:
    """Subject and Markdown body of the human approval asked before promoting (HITL operator fields).

    `judgement` is the record publish_version wrote to the store. The reviewer sees champion against
    candidate on the same test images with the paired test's gain, interval and p-value, what the rule
    decided, the serving check, the TFLite variants, and where the report and model card are.
    """
    champion = judgement["champion_version"]
    compared = judgement["gain"] is not None
    if champion is None:
        versus = "no champion yet"
    elif compared:
        versus = f"champion {judgement['champion_accuracy']:.4f}"
    else:
        versus = "champion not comparable"
    rows = [
        "| | version | accuracy |", "|---|---|---|",
        f"| candidate | `{judgement['version']}` | {judgement['new_accuracy']:.4f} |",
        (f"| champion | `{champion}` | "
         + (f"{judgement['champion_accuracy']:.4f} |" if compared else "not comparable |"))
        if champion else "| champion | none yet | |",
    ]
    noise = []
    if compared:
        low, high = judgement["gain_interval"]
        noise = [f"Gain {judgement['gain']:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}], "
                 f"p = {judgement['p_value']:.3g} ({judgement['paired_test']}): "
                 + ("the interval includes 0, so the gain may be noise." if low <= 0 <= high
                    else "the interval excludes 0."), ""]
    serving = judgement["serving_check"]
    tflite = judgement["tflite"]
    kept = [f"{name} {entry['accuracy']:.4f}, {entry['size_bytes'] / 1e6:.1f} MB, {entry['latency_ms']:.1f} ms"
            for name, entry in tflite["variants"].items() if entry.get("kept")]
    body = "\n".join([
        f"Promote **{judgement['model_name']}** version `{judgement['version']}` to champion?", "",
        *rows, "",
        f"Scored on the same {judgement['n_test']} test images: {judgement['judged_on']}.", "",
        *noise,
        f"Rule: at least {judgement['min_test_images']} test images, accuracy at least {judgement['min_accuracy']}, "
        f"and a gain over the champion of at least {judgement['margin']} with p <= {judgement['alpha']}.", "",
        f"**{'Eligible' if judgement['eligible'] else 'Not eligible'}**: {judgement['reason']}."
        + ("" if judgement["eligible"] else " Approving will not promote it."), "",
        f"Serving check: {serving['n_images']} golden images, largest difference "
        + ", ".join(f"{name} {diff:.1e}" for name, diff in serving["max_abs_diff"].items())
        + f" (tolerance {serving['tolerance']:g}).",
        f"TFLite: {tflite['status']}" + (f"; kept {'; '.join(kept)}" if kept else "") + ".", "",
        f"- Report in Airflow: [{report_page(judgement)}]({report_page(judgement)})",
        f"- Report: {judgement['report_uri']}",
        f"- Model card: {judgement['model_card_uri']}",
        f"- Version: {judgement['version_uri']}",
    ])
    return {"subject": f"Promote {judgement['model_name']} {judgement['version']} "
                       f"({judgement['new_accuracy']:.4f}, {versus})?", "body": body}


def ask(publish_uri: str, model_name: str, version: str, run_id: str, dag_id: str) -> dict[str, str]:
    """The request for `version`, from the judgement its run recorded (never from XCom); an earlier answer is
    replaced by a pending one, so only an answer to this request counts."""
    from tasks import registry

    model_root = registry.model_root_of(publish_uri, model_name)
    judgement = registry.judgement_of_run(model_root, version, run_id, dag_id)
    registry.write_approval(model_root, version, pending(version))
    return approval_request(judgement)


def assignees(approvers: tuple[str, ...], triggered_by: str | None) -> list[dict[str, str]]:
    """The HITL request's assigned users: the deployment's approvers but the user who triggered the run."""
    from tasks.errors import ConfigError

    users = [{"id": user, "name": user} for user in approvers if user != triggered_by]
    if not users:
        raise ConfigError(f"nobody may approve this run: the only approver(s) in TLP_APPROVERS "
                          f"({', '.join(approvers)}) triggered it; another approver must trigger it again, or the "
                          "deployment adds approvers")
    return users


def record_answer(publish_uri: str, model_name: str, answer: dict) -> None:
    """Keep the answer (answer_from_hitl) in the store, where promote reads it."""
    from tasks import registry

    registry.write_approval(registry.model_root_of(publish_uri, model_name), answer["version"], answer)


def answer_from_hitl(event: dict[str, Any], *, version: str, triggered_by: str | None) -> dict:
    """The plain answer to record, from the event Airflow resumed the HITL task with (its own HITL record:
    chosen_options, params_input, responded_by_user, responded_at, timedout)."""
    user = event.get("responded_by_user")
    responded_at = event.get("responded_at")
    return {
        "version": version,
        "chosen_options": [str(option) for option in event.get("chosen_options") or []],
        "comment": str((event.get("params_input") or {}).get(COMMENT) or ""),
        "responded_by": {"id": str(user["id"]), "name": str(user["name"])} if user else None,
        "responded_at": responded_at.isoformat() if isinstance(responded_at, datetime) else str(responded_at or ""),
        "timed_out": bool(event.get("timedout")) or not user,
        "triggered_by": triggered_by,
    }


def pending(version: str) -> dict:
    """The record of a request not answered yet (it replaces an earlier answer when a request is asked again)."""
    return {"version": version, "pending": True}


def review(answer: dict | None, *, version: str, judged_at: str, triggered_by: str | None,
           approvers: tuple[str, ...]) -> dict:
    """What a recorded answer means for this version: approved only when a named approver, not the user who
    triggered the run, chose Approve on this version's request after it was judged."""
    if answer is None or answer.get("pending"):
        return _review("missing", None, "", "")
    user = answer.get("responded_by")
    by = f"{user['name']} ({user['id']})" if user else None
    said = (answer.get("comment", ""), answer.get("responded_at", ""))
    triggering = {name for name in (triggered_by, answer.get("triggered_by")) if name}
    if answer.get("version") != version:
        return _review("other version", by, *said)
    if answer.get("timed_out") or not user:
        return _review("expired", None, *said)
    if triggering & {user["id"], user["name"]}:
        return _review("self-approval", by, *said)
    if not {user["id"], user["name"]} & set(approvers):
        return _review("not an approver", by, *said)
    if not _before(judged_at, said[1]):
        return _review("stale", by, *said)
    return _review("approved" if answer.get("chosen_options") == [APPROVE] else "rejected", by, *said)


def _before(earlier: str, later: str) -> bool:
    """Whether ISO time `earlier` comes before `later` (False when either does not parse)."""
    try:
        return datetime.fromisoformat(earlier) <= datetime.fromisoformat(later)
    except (TypeError, ValueError):
        return False


def _review(status: str, by: str | None, comment: str, responded_at: str) -> dict:
    return {"approved": status == "approved", "status": status, "by": by, "comment": comment,
            "responded_at": responded_at, "timed_out": status == "expired"}


def verdict(review: dict) -> str:
    """The review in words, for decision reasons."""
    said = f": {review['comment']!r}" if review["comment"] else ""
    return {
        "missing": "approval is required for this model (TLP_APPROVAL_MODELS) but no answer to its approval request "
                   "is recorded (the approve task was skipped, failed, marked by hand or never ran), which rejects",
        "other version": f"the recorded answer by {review['by']} is for another version, which rejects",
        "expired": "the approval request expired: nobody answered before it timed out, which rejects",
        "self-approval": f"answered by {review['by']}, who triggered the run and so may not approve it, which rejects",
        "not an approver": f"answered by {review['by']}, who is not one of the deployment's approvers (TLP_APPROVERS), "
                           "which rejects",
        "stale": f"the answer by {review['by']} predates this version's judgement, which rejects",
        "approved": f"approved by {review['by']}{said}",
        "rejected": f"rejected by {review['by']}{said}",
    }[review["status"]]
