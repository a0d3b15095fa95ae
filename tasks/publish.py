"""Step 7: publish the evaluated model as a verified version, and promote it when it beats the champion.

Everything lives under `<publish_uri>/<model_name>/`:

- `versions/<version>/`: model.keras, saved_model/ (for serving), metrics.json, report/,
  model_card.md, manifest.json, params.json and checksums.json ({relative path: sha256}).
  Versions are immutable once complete.
- `champion.json`: the pointer serving follows, written in one PUT and always last.
- `promotions/<decided_at>-<version>.json`: one object per decision (promoted or not, both
  scores, margin, reason), and one per rollback, so the pointer's history can be audited.

A version is complete when it has checksums.json. That file is written only after every
other object has been read back from the store and matched its sha256, so a version
without it is an interrupted or corrupted upload: list_versions ignores it, rollback
refuses it, nothing points at it, and re-publishing the run deletes and redoes it.

Version ids are `<UTC time of the first attempt, to the millisecond>-<12 hex>`
(`20261122T081500.123Z-3fa2b1c9d0e4`), the hex a hash of the run id and the model's
sha256: ids sort by time, and a re-run of publish for the same run and model finds its
version by that suffix and reuses it (no second version, and no second decision once one
is recorded). A model retrained within the same run is a new version.

Store failures raise tasks.storage.StorageError (naming the URI and what to check); one
authenticated call comes before any upload, so bad credentials or a dead endpoint leave
nothing behind. A missing bucket is created, with a warning naming it (a typo in
publish_uri shows up there). Two publishers racing on one model both record their
decisions; the last champion PUT wins (S3 gives no compare-and-swap to lean on).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks import artifacts, settings, storage
from tasks.config import RunConfig
from tasks.errors import PublishError

log = logging.getLogger(__name__)

METRIC = "accuracy"
CHECKSUMS = "checksums.json"
CHAMPION = "champion.json"
MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
PARAMS_FILE = "params.json"
SAVED_MODEL_DIR = "saved_model"
# what the run root must hold, and the name each input gets inside a version
INPUTS = {
    MODEL_FILE: artifacts.MODEL,
    METRICS_FILE: artifacts.METRICS,
    "report": artifacts.REPORT,
    "model_card.md": artifacts.MODEL_CARD,
    MANIFEST_FILE: artifacts.MANIFEST,
}
TEST_SPLIT = "test"
VERSION_TIME = "%Y%m%dT%H%M%S.%fZ"  # %f as milliseconds
RUN_HASH_CHARS = 12
TOLERANCE = 1e-9  # accuracies are ratios of counts: absorb float error when comparing against the margin



def publish(cfg: RunConfig, evaluation: dict | None = None) -> dict:
    """Upload this run's model as a verified version and promote it if it beats the champion.

    `evaluation` is the evaluate step's result; when given, its accuracy must match the
    run root's metrics.json (a stale metrics file would otherwise be published). The
    champion is re-evaluated on this run's test split, so both scores come from the
    same images; it is replaced only when the new model is better by at least
    `settings.load().promotion_margin` (a tie never promotes), or when `False` is set.
    """
    inputs = _run_inputs(cfg)
    model_root = storage.join(cfg.publish_uri, cfg.model_name)
    if storage.ensure_bucket(cfg.publish_uri):
        log.warning("publish: bucket of %s did not exist and was created; check publish_uri if that is a surprise",
                    cfg.publish_uri)
    with tempfile.TemporaryDirectory(prefix="tlp-publish-") as scratch_dir:
        scratch = Path(scratch_dir)
        stage = scratch / "version"
        for name, uri in inputs.items():
            storage.download(uri, stage / name)
        metrics = json.loads((stage / METRICS_FILE).read_text())
        _check_metrics(metrics, json.loads((stage / MANIFEST_FILE).read_text()), evaluation)
        version, complete = _version_for(model_root, cfg.run_id, storage.sha256_file(stage / MODEL_FILE))
        version_uri = _version_uri(model_root, version)
        if complete:
            log.info("publish: %s is already published and verified; not uploading again", version_uri)
        else:
            _complete_stage(cfg, stage)
            _upload_verified(stage, version_uri)
        decision = _recorded_decision(model_root, version)
        if decision is None:
            test_records = storage.download(cfg.artifact(artifacts.split_records(TEST_SPLIT)),
                                            scratch / f"{TEST_SPLIT}.tfrecord")
            decision = _decide(cfg, model_root, version, metrics, test_records, scratch)
        else:
            log.info("publish: decision for %s already recorded at %s; not deciding again",
                     version, decision["decision"])
    if decision["promoted"]:
        _finish_promotion(model_root, decision, metrics)
    log.info("publish: %s %s (%s)", version_uri, "promoted" if decision["promoted"] else "not promoted",
             decision["reason"])
    result = {key: decision[key] for key in ("version", "version_uri", "promoted", "reason", "new_accuracy",
                                             "champion_accuracy", "champion_version")}
    storage.write_json(cfg.artifact(artifacts.PUBLISHED), result)
    return result


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
    found = {_relative(item, version_uri): item for item in storage.list_files(version_uri.rstrip("/") + "/")}
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
    """Point champion.json back at an earlier complete version, after verifying it again.

    The rollback is recorded under promotions/ like any decision, with reason
    "rollback: <reason>", before the pointer is written.
    """
    model_root = storage.join(publish_uri, model_name)
    available = _complete_versions(model_root)
    if version not in available:
        raise PublishError(f"{version!r} is not a complete version of {model_root}; available: "
                           f"{', '.join(available) or 'none (publish a model first)'}")
    version_uri = _version_uri(model_root, version)
    verify_version(version_uri)
    metrics = storage.read_json(storage.join(version_uri, METRICS_FILE))
    champion = _champion(model_root)
    decision = _record(model_root, {
        "kind": "rollback",
        "version": version,
        "version_uri": version_uri,
        "run_id": storage.read_json(storage.join(version_uri, PARAMS_FILE))["run_id"],
        "promoted": True,
        "reason": f"rollback: {reason}",
        "new_accuracy": metrics[METRIC],
        "champion_accuracy": None,
        **_champion_fields(champion),
    })
    _write_champion(model_root, decision, metrics)
    log.info("rollback: %s now points at %s (was %s): %s", storage.join(model_root, CHAMPION), version,
             decision["champion_version"], reason)
    return {"version": version, "version_uri": version_uri, "previous_version": decision["champion_version"],
            "reason": decision["reason"], "decision": decision["decision"]}


def list_versions(publish_uri: str, model_name: str) -> list[dict]:
    """Complete versions, oldest first: version, uri, accuracy, created, champion (now), promoted (ever)."""
    model_root = storage.join(publish_uri, model_name)
    champion = _champion(model_root)
    promoted = {decision["version"] for decision in _decisions(model_root) if decision["promoted"]}
    rows = []
    for version in _complete_versions(model_root):
        version_uri = _version_uri(model_root, version)
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
    return _decisions(storage.join(publish_uri, model_name))


def read_champion(publish_uri: str, model_name: str) -> dict | None:
    """The current champion pointer, or None before the first promotion."""
    return _champion(storage.join(publish_uri, model_name))


def _run_inputs(cfg: RunConfig) -> dict[str, str]:
    """The run-root URIs publish stages in, checked up front so a missing one fails before any upload."""
    uris = artifacts.require(cfg, *INPUTS.values(), artifacts.split_records(TEST_SPLIT))
    return dict(zip(INPUTS, uris))


def _check_metrics(metrics: dict, manifest: dict, evaluation: dict | None) -> None:
    """Refuse metrics computed on another data selection, or older than the evaluation that ran."""
    if metrics.get("manifest_hash") != manifest["hash"]:
        raise PublishError(f"metrics.json was computed on data selection {metrics.get('manifest_hash')!r}, "
                           f"but manifest.json is {manifest['hash']!r}; re-run evaluate for this run")
    if list(metrics["classes"]) != list(manifest["classes"]):
        raise PublishError(f"metrics.json classes {metrics['classes']} differ from manifest.json classes "
                           f"{manifest['classes']}; re-run evaluate for this run")
    if evaluation is not None and "accuracy" in evaluation \
            and not math.isclose(evaluation["accuracy"], metrics[METRIC], abs_tol=TOLERANCE):
        raise PublishError(f"metrics.json accuracy {metrics[METRIC]} differs from the evaluation's "
                           f"{evaluation['accuracy']}; re-run evaluate for this run")


def _version_for(model_root: str, run_id: str, model_sha256: str) -> tuple[str, bool]:
    """(version id, complete?) for this run's model: the existing one if published before, else a new id.

    An incomplete earlier attempt is deleted, so the upload starts from nothing.
    """
    run_hash = hashlib.sha256(f"{run_id}\n{model_sha256}".encode()).hexdigest()[:RUN_HASH_CHARS]
    for version, files in _version_files(model_root).items():
        if version.endswith(f"-{run_hash}"):
            if CHECKSUMS in files:
                return version, True
            log.info("publish: deleting incomplete earlier upload of %s", version)
            storage.delete(_version_uri(model_root, version) + "/")
            return version, False
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{run_hash}", False


def _complete_stage(cfg: RunConfig, stage: Path) -> None:
    """Add what the run root does not hold: the SavedModel export for serving and the run's params."""
    import keras

    model = keras.saving.load_model(stage / MODEL_FILE, compile=False)
    model.export(str(stage / SAVED_MODEL_DIR), verbose=False)
    (stage / PARAMS_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def _upload_verified(stage: Path, version_uri: str) -> None:
    """Hash, upload, read everything back, and only then write checksums.json: the mark of a complete version."""
    checksums = {path.relative_to(stage).as_posix(): storage.sha256_file(path)
                 for path in sorted(stage.rglob("*")) if path.is_file()}
    storage.upload(stage, version_uri)
    verify_version(version_uri, checksums)
    storage.write_json(storage.join(version_uri, CHECKSUMS), checksums)
    log.info("publish: uploaded and verified %d files (%.1f MB) to %s", len(checksums),
             sum(path.stat().st_size for path in stage.rglob("*") if path.is_file()) / 1e6, version_uri)


def _decide(cfg: RunConfig, model_root: str, version: str, metrics: dict, test_records: Path,
            scratch: Path) -> dict:
    """Compare with the champion on this run's test split, and record the decision."""
    champion = _champion(model_root)
    new_accuracy = float(metrics[METRIC])
    classes = list(metrics["classes"])
    champion_accuracy = None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif list(champion["classes"]) != classes:
        promoted = False
        reason = (f"no comparison possible: champion {champion['version']} predicts {champion['classes']}, "
                  f"this run {classes}; " + ("promoted because force_promote is set" if promoted
                                             else "not promoted (set force_promote to replace it)"))
    else:
        champion_accuracy = _champion_accuracy(champion, test_records, cfg.batch_size, metrics["n_test"], scratch)
        gain = new_accuracy - champion_accuracy
        beats = gain > TOLERANCE and gain >= settings.load().promotion_margin - TOLERANCE
        promoted = beats or False
        reason = (f"{new_accuracy:.4f} vs champion {champion['version']} {champion_accuracy:.4f} on this run's "
                  f"{metrics['n_test']} test images: gain {gain:+.4f} "
                  + ("beats the champion by at least" if beats else "does not beat the champion by")
                  + f" the margin {settings.load().promotion_margin}"
                  + ("; promoted because force_promote is set" if promoted and not beats else ""))
    return _record(model_root, {
        "kind": "publish",
        "version": version,
        "version_uri": _version_uri(model_root, version),
        "run_id": cfg.run_id,
        "promoted": promoted,
        "reason": reason,
        "new_accuracy": new_accuracy,
        "champion_accuracy": champion_accuracy,
        "margin": settings.load().promotion_margin,
        "force_promote": False,
        **_champion_fields(champion),
    })


def _champion_accuracy(champion: dict, test_records: Path, batch_size: int, n_test: int, scratch: Path) -> float:
    """The champion's accuracy on this run's test split (at the champion's own input size)."""
    import keras
    import numpy as np

    from tasks.predict import predict_records

    path = storage.download(storage.join(champion["uri"], MODEL_FILE), scratch / "champion" / MODEL_FILE)
    model = keras.saving.load_model(path, compile=False)
    probabilities, labels, _ = predict_records(model, test_records, batch_size)
    if len(labels) != n_test:
        raise PublishError(f"metrics.json counts {n_test} test images but the test split has {len(labels)}; "
                           "re-run evaluate for this run")
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def _champion_fields(champion: dict | None) -> dict:
    """What a decision records about the champion it was made against."""
    return {"champion_version": champion["version"] if champion else None,
            "champion_decision": champion["decision"] if champion else None}


def _record(model_root: str, decision: dict) -> dict:
    """Write a decision as its own object under promotions/; returns it with its key and time."""
    now = datetime.now(timezone.utc)
    key = f"promotions/{now:%Y%m%dT%H%M%S%fZ}-{decision['version']}.json"
    decision = {**decision, "metric": METRIC, "decided_at": now.isoformat(), "decision": key}
    storage.write_json(storage.join(model_root, key), decision)
    return decision


def _recorded_decision(model_root: str, version: str) -> dict | None:
    """The publish decision already made for a version (by an earlier run of this step), if any."""
    found = [d for d in _decisions(model_root, version) if d["kind"] == "publish"]
    return found[-1] if found else None


def _decisions(model_root: str, version: str | None = None) -> list[dict]:
    items = storage.list_files(storage.join(model_root, "promotions") + "/")
    if version is not None:
        items = [item for item in items if item.endswith(f"-{version}.json")]
    return [storage.read_json(item) for item in items]


def _finish_promotion(model_root: str, decision: dict, metrics: dict) -> None:
    """Write the pointer for a promoting decision, unless the pointer changed since it was made.

    A retried publish whose decision was recorded but whose pointer PUT never ran finishes
    it here; if another promotion or a rollback moved the pointer meanwhile, that later
    choice stands.
    """
    champion = _champion(model_root)
    if (champion["decision"] if champion else None) == decision["champion_decision"]:
        _write_champion(model_root, decision, metrics)


def _write_champion(model_root: str, decision: dict, metrics: dict) -> None:
    """The pointer, in one PUT: which version serves, its own test score and classes, and why."""
    storage.write_json(storage.join(model_root, CHAMPION), {
        "version": decision["version"],
        "uri": decision["version_uri"],
        "model_uri": storage.join(decision["version_uri"], MODEL_FILE),
        "saved_model_uri": storage.join(decision["version_uri"], SAVED_MODEL_DIR),
        "accuracy": metrics[METRIC],
        "metric": METRIC,
        "classes": list(metrics["classes"]),
        "run_id": decision["run_id"],
        "promoted_at": decision["decided_at"],
        "decision": decision["decision"],
    })


def _champion(model_root: str) -> dict | None:
    uri = storage.join(model_root, CHAMPION)
    return storage.read_json(uri) if storage.exists(uri) else None


def _version_files(model_root: str) -> dict[str, set[str]]:
    """Each version's relative file paths, complete or not."""
    base = storage.join(model_root, "versions")
    files: dict[str, set[str]] = {}
    for item in storage.list_files(base + "/"):
        version, _, name = _relative(item, base).partition("/")
        files.setdefault(version, set()).add(name)
    return files


def _complete_versions(model_root: str) -> list[str]:
    return sorted(version for version, files in _version_files(model_root).items() if CHECKSUMS in files)


def _version_uri(model_root: str, version: str) -> str:
    return storage.join(model_root, "versions", version)


def _relative(item: str, base: str) -> str:
    return item[len(base.rstrip("/")) + 1:]


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.publish list|rollback ...`: inspect versions or move the champion back by hand."""
    parser = argparse.ArgumentParser(prog="python -m tasks.publish", description=main.__doc__)
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
