"""Human approval before a promotion: what the approver reads, the answers offered, and what they meant.

Kept free of heavy imports: the DAG file builds Airflow's HITL operator from
these names at parse time, and tasks.steps.promote reads the operator's answer with
`read_review`. No answer before the timeout selects the default, Reject.
"""
from __future__ import annotations

from urllib.parse import quote

APPROVE, REJECT = "Approve", "Reject"
OPTIONS = [APPROVE, REJECT]
COMMENT = "comment"
REPORT_PAGE = "/ml-reports/runs/{dag_id}/{run_id}/eval/report/"  # plugins/ml_reports.py serves it


def report_page(published: dict) -> str:
    """The candidate's report in the Airflow UI (the plugin's run view), relative to the Airflow base URL."""
    return REPORT_PAGE.format(dag_id=published["dag_id"], run_id=quote(published["run_id"], safe=""))


def approval_request(published: dict, changes: dict | None = None) -> dict[str, str]:
    """Subject and Markdown body of the human approval asked before promoting (HITL operator fields).

    The reviewer sees champion against candidate on the same test images, what the
    rule decided, the serving check, the TFLite variants, and where the candidate's
    report and model card are. The operator's form should offer a `comment` field.
    """
    champion = published["champion_version"]
    champion_score = ("not comparable" if published["champion_accuracy"] is None
                      else f"{published['champion_accuracy']:.4f}")
    rows = [
        "| | version | accuracy |", "|---|---|---|",
        f"| candidate | `{published['version']}` | {published['new_accuracy']:.4f} |",
        f"| champion | `{champion}` | {champion_score} |" if champion else "| champion | none yet | |",
    ]
    serving = published["serving_check"]
    tflite = published["tflite"]
    kept = [f"{name} {entry['accuracy']:.4f}, {entry['size_bytes'] / 1e6:.1f} MB, {entry['latency_ms']:.1f} ms"
            for name, entry in tflite["variants"].items() if entry.get("kept")]
    body = "\n".join([
        f"Promote **{published['model_name']}** version `{published['version']}` to champion?", "",
        *rows, "",
        f"Scored on this run's {published['n_test']} test images. Rule: at least {published['min_accuracy']} and "
        f"a gain of at least {published['margin']} over the champion.",
        f"**{'Eligible' if published['eligible'] else 'Not eligible'}**: {published['reason']}."
        + ("" if published["eligible"] else " Approving will not promote it."), "",
        *([f"Data: {_changes_line(changes)}.", ""] if changes and changes.get("files") else []),
        f"Serving check: {serving['n_images']} golden images, largest difference "
        + ", ".join(f"{name} {diff:.1e}" for name, diff in serving["max_abs_diff"].items())
        + f" (tolerance {serving['tolerance']:g}).",
        f"TFLite: {tflite['status']}" + (f"; kept {'; '.join(kept)}" if kept else "") + ".", "",
        f"Report in Airflow: [{report_page(published)}]({report_page(published)})",
        f"Report: {published['report_uri']}", f"Model card: {published['model_card_uri']}",
        f"Version: {published['version_uri']}",
    ])
    return {"subject": f"Promote {published['model_name']} {published['version']} "
                       f"({published['new_accuracy']:.4f} vs {champion_score})?", "body": body}


def _changes_line(changes: dict) -> str:
    from tasks.data_changes import summary_line  # numpy: kept out of DAG parsing, which imports this module

    return summary_line(changes)


def read_review(approval: dict | None) -> dict | None:
    """What a human said, from the HITL operator's result: approved?, by whom, their comment, when."""
    if approval is None:
        return None
    user = approval.get("responded_by_user")
    timed_out = bool(approval.get("timedout")) or not user
    return {"approved": not timed_out and list(approval.get("chosen_options") or []) == [APPROVE],
            "by": None if timed_out else f"{user['name']} ({user['id']})",
            "comment": str((approval.get("params_input") or {}).get(COMMENT) or ""),
            "responded_at": str(approval.get("responded_at") or ""),
            "timed_out": timed_out}


def verdict(review: dict) -> str:
    """The review in words, for decision reasons."""
    if review["timed_out"]:
        return "nobody answered the approval request before it timed out, which rejects"
    said = f": {review['comment']!r}" if review["comment"] else ""
    return f"{'approved' if review['approved'] else 'rejected'} by {review['by']}{said}"
