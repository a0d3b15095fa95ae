"""The model registry: where published versions live, how they are listed and verified, and rollback.

Everything lives under `<publish_uri>/<model_name>/`:

- `versions/<version>/`: model/ (classifier spec + weights), saved_model/ (for serving),
  tflite/<variant>.tflite (the TFLite variants that kept the accuracy), metrics.json (with the serving
  check and TFLite sections), report/ (with release.html: those checks), model_card.md (with a release
  section), manifest.json, params.json, test/test.tfrecord (the run's test split: a later candidate is also
  judged on it), predictions.json (the model's answer per judged image, by sha256) and checksums.json
  ({relative path: sha256}).
  Versions are immutable once complete.
- `judgements/<version>.json`: what publish_version judged (eligible or not and why, both scores on the same
  test images, the paired test); promote reads eligibility and scores from here, never from XCom.
- `approvals/<version>.json`: the human answer to the approval request, copied from Airflow's own HITL
  record by the approval task (who, what, when, the comment; or that the request expired).
- `champion.json`: the pointer serving follows, moved only by conditional writes (tasks.pointer).
- `promotions/<decided_at>-<version>.json`: one object per decision (promoted or not, both
  scores, the rule's numbers, who approved or rejected and their comment), and one
  per rollback, so the pointer's history can be audited.

A version is complete when it has checksums.json. That file is written only after every
other object has been read back from the store and matched its sha256, so a version
without it is an interrupted or corrupted upload: list_versions ignores it, rollback
refuses it, nothing points at it, and re-publishing the run deletes and redoes it.

Version ids are `<UTC time of the first attempt, to the millisecond>-<12 hex>`
(`20261122T081500.123Z-3fa2b1c9d0e4`), the hex a hash of the run id and the model's
sha256: ids sort by time.

`python -m tasks.registry list|rollback ...` inspects versions or moves the champion by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

from tasks import pointer, storage
from tasks.errors import PublishError

log = logging.getLogger(__name__)

METRIC = "accuracy"
CHECKSUMS = "checksums.json"
CHAMPION = "champion.json"
MODEL_DIR = "model"  # the classifier folder (tasks.classifier): spec + weights
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
PARAMS_FILE = "params.json"
SAVED_MODEL_DIR = "saved_model"
TFLITE_DIR = "tflite"
REPORT_DIR = "report"
MODEL_CARD_FILE = "model_card.md"
PREDICTIONS_FILE = "predictions.json"
TEST_RECORDS = "test/test.tfrecord"
VERSION_TIME = "%Y%m%dT%H%M%S.%fZ"  # %f as milliseconds
VERSION_ID = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}")
PROMOTE_ATTEMPTS = 5  # pointer writes lost to other promotions before giving up


def verify_version(version_uri: str, checksums: dict[str, str] | None = None) -> None:
    """Read back every object of a version and match its sha256; PublishError names each that differs.

    Without `checksums`, the version's own checksums.json is the reference (a version
    without one is incomplete and fails). Missing objects and objects that checksums
    do not list fail too: a verified version is exactly what was hashed.
    """
    if checksums is None:
        checksums_uri = storage.join(version_uri, CHECKSUMS)
        if not storage.exists(checksums_uri):
            raise PublishError(f"{version_uri} is incomplete (no {CHECKSUMS}); re-run publish for its run")
        checksums = storage.read_json(checksums_uri)
    found = {relative(item, version_uri): item for item in storage.list_files(version_uri.rstrip("/") + "/")}
    found.pop(CHECKSUMS, None)
    problems = []
    for name in sorted(set(checksums) | set(found)):
        if name not in found:
            problems.append(f"{name} is missing")
        elif name not in checksums:
            problems.append(f"{name} is not in the checksums")
        elif hashlib.sha256(storage.read_bytes(found[name])).hexdigest() != checksums[name]:
            problems.append(f"{name} does not match its sha256")
    if problems:
        raise PublishError(f"{version_uri} failed verification: {'; '.join(problems)}. Check the object store; "
                           "a failed upload stays incomplete and re-running publish for its run uploads it again")


def rollback(publish_uri: str, model_name: str, version: str, reason: str) -> dict:
    """Point champion.json at another complete version (usually an earlier one), after verifying it again.

    Also the way to promote by hand what the rule cannot compare (a class change).
    Recorded under promotions/ like any decision, with reason "rollback: <reason>",
    once the pointer has moved.
    """
    model_root = model_root_of(publish_uri, model_name)
    available = complete_versions(model_root)
    if version not in available:
        raise PublishError(f"{version!r} is not a complete version of {model_root}; available: "
                           f"{', '.join(available) or 'none (publish a model first)'}")
    version_uri = version_uri_of(model_root, version)
    verify_version(version_uri)
    metrics = storage.read_json(storage.join(version_uri, METRICS_FILE))
    pointer.require_conditional_writes(model_root)
    for _ in range(PROMOTE_ATTEMPTS):
        champion, tag = pointer.read(storage.join(model_root, CHAMPION))
        decision = stamp({
            "kind": "rollback",
            "version": version,
            "version_uri": version_uri,
            "run_id": storage.read_json(storage.join(version_uri, PARAMS_FILE))["run_id"],
            "promoted": True,
            "reason": f"rollback: {reason}",
            "new_accuracy": metrics[METRIC],
            "champion_accuracy": None,
            **champion_fields(champion),
        })
        if pointer.write_if(storage.join(model_root, CHAMPION), pointer_for(decision, list(metrics["classes"])), tag):
            break
    else:
        raise PublishError(f"{storage.join(model_root, CHAMPION)} moved {PROMOTE_ATTEMPTS} times during the "
                           "rollback (publishes are promoting); run the rollback again")
    record(model_root, decision)
    log.info("rollback: %s now points at %s (was %s): %s", storage.join(model_root, CHAMPION), version,
             decision["champion_version"], reason)
    return {"version": version, "version_uri": version_uri, "previous_version": decision["champion_version"],
            "reason": decision["reason"], "decision": decision["decision"]}


def list_versions(publish_uri: str, model_name: str) -> list[dict]:
    """Complete versions, oldest first: version, uri, accuracy, created, champion (now), promoted (ever)."""
    model_root = model_root_of(publish_uri, model_name)
    champion = champion_at(model_root)
    promoted = {decision["version"] for decision in decisions(model_root) if decision["promoted"]}
    rows = []
    for version in complete_versions(model_root):
        version_uri = version_uri_of(model_root, version)
        rows.append({
            "version": version,
            "uri": version_uri,
            "accuracy": storage.read_json(storage.join(version_uri, METRICS_FILE))[METRIC],
            "created": datetime.strptime(version.split("-")[0], VERSION_TIME).isoformat("T", "milliseconds") + "Z",
            "champion": champion is not None and champion["version"] == version,
            "promoted": version in promoted,
        })
    return rows


def list_decisions(publish_uri: str, model_name: str) -> list[dict]:
    """Every recorded promotion decision and rollback, oldest first."""
    return decisions(model_root_of(publish_uri, model_name))


def read_champion(publish_uri: str, model_name: str) -> dict | None:
    """The current champion pointer, or None before the first promotion."""
    return champion_at(model_root_of(publish_uri, model_name))


def check_version_id(version: object) -> str:
    """`version` if it has the form of a version id; PublishError otherwise (it names a location under versions/,
    so nothing else may pass: no '/', no '..')."""
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version):
        raise PublishError(f"{version!r} is not a version id (like 20261122T081500.123Z-3fa2b1c9d0e4); promote takes "
                           "the id publish_version returned")
    return version


def write_judgement(model_root: str, judgement: dict) -> None:
    """Record what publish_version judged for a version (the one place promote reads eligibility and scores)."""
    storage.write_json(_record_uri(model_root, "judgements", judgement["version"]), judgement)


def read_judgement(model_root: str, version: str) -> dict | None:
    uri = _record_uri(model_root, "judgements", version)
    return storage.read_json(uri) if storage.exists(uri) else None


def judgement_of_run(model_root: str, version: str, run_id: str, dag_id: str) -> dict:
    """The judgement recorded for `version`; PublishError when there is none, or when another run (or another
    location) published it: a run promotes, and asks approval for, only what it published."""
    judgement = read_judgement(model_root, version)
    if judgement is None:
        raise PublishError(f"{version} has no recorded judgement under {model_root}/judgements/: it was never "
                           "published there; run publish_version for this run first")
    expected = (run_id, dag_id, version_uri_of(model_root, version))
    if (judgement["run_id"], judgement["dag_id"], judgement["version_uri"]) != expected:
        raise PublishError(f"{version} was published by run {judgement['run_id']!r} of {judgement['dag_id']!r}, not by "
                           f"this run ({run_id!r} of {dag_id!r}): a run promotes only what it published")
    return judgement


def newest_judged_version(model_root: str) -> str | None:
    """The newest complete version with a recorded judgement (promoted or not), or None."""
    judged = [relative(item, storage.join(model_root, "judgements"))[:-len(".json")]
              for item in storage.list_files(storage.join(model_root, "judgements") + "/") if item.endswith(".json")]
    for version in sorted((version for version in judged if VERSION_ID.fullmatch(version)), reverse=True):
        if storage.exists(storage.join(version_uri_of(model_root, version), CHECKSUMS)):
            return version
    return None


def read_verified_json(version_uri: str, name: str) -> Any:
    """A JSON record of a complete version (manifest.json, params.json, ...), read once and matched against the
    version's checksums.json; PublishError when the version is incomplete or the record does not match."""
    checksums_uri = storage.join(version_uri, CHECKSUMS)
    if not storage.exists(checksums_uri):
        raise PublishError(f"{version_uri} is incomplete (no {CHECKSUMS}); re-run publish for its run")
    expected = storage.read_json(checksums_uri).get(name)
    data = storage.read_bytes(storage.join(version_uri, name))
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise PublishError(f"{storage.join(version_uri, name)} does not match {CHECKSUMS}: check the object store")
    return json.loads(data)


def write_approval(model_root: str, version: str, answer: dict) -> None:
    """Record the answer to a version's approval request (replacing an earlier one: a new request resets it)."""
    storage.write_json(_record_uri(model_root, "approvals", version), answer)


def read_approval(model_root: str, version: str) -> dict | None:
    uri = _record_uri(model_root, "approvals", version)
    return storage.read_json(uri) if storage.exists(uri) else None


def _record_uri(model_root: str, kind: str, version: str) -> str:
    return storage.join(model_root, kind, f"{check_version_id(version)}.json")


def champion_fields(champion: dict | None) -> dict:
    """What a decision records about the champion it was made against."""
    return {"champion_version": champion["version"] if champion else None,
            "champion_decision": champion["decision"] if champion else None}


def stamp(decision: dict) -> dict:
    """A decision with its metric, time and the key it is recorded under (the pointer names that key)."""
    now = datetime.now(timezone.utc)
    return {**decision, "metric": METRIC, "decided_at": now.isoformat(),
            "decision": f"promotions/{now:%Y%m%dT%H%M%S%fZ}-{decision['version']}.json"}


def record(model_root: str, decision: dict) -> dict:
    """Write a decision as its own object under promotions/; returns it."""
    storage.write_json(storage.join(model_root, decision["decision"]), decision)
    return decision


def recorded_decision(model_root: str, version: str) -> dict | None:
    """The publish decision already made for a version (by an earlier run of this step), if any."""
    found = [d for d in decisions(model_root, version) if d["kind"] == "publish"]
    return found[-1] if found else None


def decisions(model_root: str, version: str | None = None) -> list[dict]:
    items = storage.list_files(storage.join(model_root, "promotions") + "/")
    if version is not None:
        items = [item for item in items if item.endswith(f"-{version}.json")]
    return [storage.read_json(item) for item in items]


def pointer_for(decision: dict, classes: list[str]) -> dict:
    """The champion pointer for a decision: which version serves, its own test score and classes, why, and
    which decision it replaces."""
    return {
        "version": decision["version"],
        "uri": decision["version_uri"],
        "model_uri": storage.join(decision["version_uri"], MODEL_DIR),
        "saved_model_uri": storage.join(decision["version_uri"], SAVED_MODEL_DIR),
        "accuracy": decision["new_accuracy"],
        "metric": METRIC,
        "classes": list(classes),
        "run_id": decision["run_id"],
        "promoted_at": decision["decided_at"],
        "decision": decision["decision"],
        "replaces": decision["champion_decision"],
    }


def champion_at(model_root: str) -> dict | None:
    return pointer.read(storage.join(model_root, CHAMPION))[0]


def model_root_of(publish_uri: str, model_name: str) -> str:
    return storage.join(publish_uri, model_name)


def version_files(model_root: str) -> dict[str, set[str]]:
    """Each version's relative file paths, complete or not."""
    base = storage.join(model_root, "versions")
    files: dict[str, set[str]] = {}
    for item in storage.list_files(base + "/"):
        version, _, name = relative(item, base).partition("/")
        files.setdefault(version, set()).add(name)
    return files


def complete_versions(model_root: str) -> list[str]:
    return sorted(version for version, files in version_files(model_root).items() if CHECKSUMS in files)


def version_uri_of(model_root: str, version: str) -> str:
    return storage.join(model_root, "versions", version)


def relative(item: str, base: str) -> str:
    return item[len(base.rstrip("/")) + 1:]


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.registry list|rollback ...`: inspect versions or move the champion back by hand."""
    parser = argparse.ArgumentParser(prog="python -m tasks.registry", description=main.__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--publish-uri", required=True, help="e.g. s3://models")
    common.add_argument("--model-name", required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="complete versions with accuracy and champion flag")
    back = commands.add_parser("rollback", parents=[common], help="point champion.json at an earlier version")
    back.add_argument("--version", required=True)
    back.add_argument("--reason", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "rollback":
            result: Any = rollback(args.publish_uri, args.model_name, args.version, args.reason)
        else:
            result = list_versions(args.publish_uri, args.model_name)
    except (PublishError, storage.StorageError) as error:
        parser.exit(1, f"error: {error}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
