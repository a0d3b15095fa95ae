"""Step 7: publish the evaluated model as a verified version; promote it when it may and, if asked, a human agrees.

Everything lives under `<publish_uri>/<model_name>/`:

- `versions/<version>/`: model/ (classifier spec + weights), saved_model/ (for serving),
  tflite/<variant>.tflite (the TFLite variants that kept the accuracy), metrics.json (with the serving
  check and TFLite sections), report/ (with release.html: those checks), model_card.md (with a release
  section), manifest.json, params.json and checksums.json ({relative path: sha256}).
  Versions are immutable once complete.
- `champion.json`: the pointer serving follows, moved only by conditional writes (tasks.pointer).
- `promotions/<decided_at>-<version>.json`: one object per decision (promoted or not, both
  scores, the rule's floor and margin, who approved or rejected and their comment), and one
  per rollback, so the pointer's history can be audited.

Publishing is two calls so that a human can approve in between (Airflow's HITL operators):
`publish_version` checks that what would be served answers like what was evaluated (a fresh
process rebuilds the classifier from model/ and loads the SavedModel's serving signature and reproduces
evaluate's golden batch), converts and measures the TFLite variants, uploads the verified
version, and decides whether it MAY be promoted: at least the deployment's floor
(settings.min_accuracy) and better than the champion, re-scored on this run's test split, by
at least settings.promotion_margin. `promote` then moves the pointer (only for an eligible,
and where asked approved, candidate) and records the decision. `publish` is both, unasked.

A version is complete when it has checksums.json. That file is written only after every
other object has been read back from the store and matched its sha256, so a version
without it is an interrupted or corrupted upload: list_versions ignores it, rollback
refuses it, nothing points at it, and re-publishing the run deletes and redoes it.

Version ids are `<UTC time of the first attempt, to the millisecond>-<12 hex>`
(`20261122T081500.123Z-3fa2b1c9d0e4`), the hex a hash of the run id and the model's
sha256: ids sort by time, and a re-run of publish for the same run and model finds its
version by that suffix and reuses it (no second version, and no second decision once one
is recorded). A model retrained within the same run is a new version.

Two publishes of one model may promote at once. The pointer is written only if it is still
the one the candidate was judged against; the loser of that race reads the new champion,
judges the candidate again against it (re-scoring it on its own test split), and either
tries again or records why not. The pointer is then read back, and the decision is recorded
only after that, so no result, publish.json or record claims a promotion that did not
happen; a retry after a crash between pointer and record writes the missing record.

Store failures raise tasks.storage.StorageError (naming the URI and what to check); one
authenticated call comes before any upload, so bad credentials or a dead endpoint leave
nothing behind. A missing bucket is created, with a warning naming it (a typo in
publish_uri shows up there).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks import artifacts, classifier, model_card, pointer, report, serving_check, settings, storage, tflite_export
from tasks.approval import read_review, verdict
from tasks.config import RunConfig
from tasks.errors import PublishError
from tasks.phases import FEATURE_EXTRACTION
from tasks.scratch import scratch_dir

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
# what the run root must hold, and the name each input gets inside a version (with MODEL_DIR: the model
# evaluate kept, artifacts.MODELS[metrics["kept"]])
INPUTS = {
    METRICS_FILE: artifacts.METRICS,
    REPORT_DIR: artifacts.REPORT,
    MODEL_CARD_FILE: artifacts.MODEL_CARD,
    MANIFEST_FILE: artifacts.MANIFEST,
}
TEST_SPLIT = "test"
VERSION_TIME = "%Y%m%dT%H%M%S.%fZ"  # %f as milliseconds
RUN_HASH_CHARS = 12
TOLERANCE = 1e-9  # accuracies are ratios of counts: absorb float error when comparing against the margin
PROMOTE_ATTEMPTS = 5  # pointer writes lost to other promotions before giving up
RESULT_KEYS = ("version", "version_uri", "promoted", "reason", "eligible", "new_accuracy", "champion_accuracy",
               "champion_version", "approval", "decision")


def publish(cfg: RunConfig, evaluation: dict | None = None) -> dict:
    """Publish the run's model and promote it if it may, with no human approval (deployments that ask none)."""
    return promote(cfg, publish_version(cfg, evaluation))


def publish_version(cfg: RunConfig, evaluation: dict | None = None) -> dict:
    """Upload this run's model as a verified version and judge whether it may replace the champion.

    `evaluation` is the evaluate step's result; when given, its accuracy must match the
    run root's metrics.json (a stale metrics file would otherwise be published). Before
    anything is uploaded, the serving check must pass and the TFLite variants are made.
    Returns what promote and the approval request need: the version, `eligible` and why,
    both accuracies, the rule's floor and margin, and where the report is.
    """
    inputs, golden_uri, test_uri = _run_inputs(cfg)
    model_root = _model_root(cfg.publish_uri, cfg.model_name)
    if storage.ensure_bucket(cfg.publish_uri):
        log.warning("publish: bucket of %s did not exist and was created; check publish_uri if that is a surprise",
                    cfg.publish_uri)
    with scratch_dir("publish") as scratch:
        stage = scratch / "version"
        for name, uri in inputs.items():
            storage.download(uri, stage / name)
        metrics = json.loads((stage / METRICS_FILE).read_text())
        _check_metrics(metrics, json.loads((stage / MANIFEST_FILE).read_text()), evaluation)
        model_sha256 = storage.sha256_file(stage / MODEL_DIR / classifier.WEIGHTS_FILE)
        version, complete = _version_for(model_root, cfg.run_id, model_sha256)
        version_uri = _version_uri(model_root, version)
        test_records = storage.download(test_uri, scratch / f"{TEST_SPLIT}.tfrecord")
        if complete:
            log.info("publish: %s is already published and verified; not uploading again", version_uri)
            metrics = storage.read_json(storage.join(version_uri, METRICS_FILE))
        else:
            golden = storage.download(golden_uri, scratch / "golden.npz")
            metrics = _complete_stage(cfg, stage, metrics, golden, test_records, version_uri)
            _upload_verified(stage, version_uri)
        recorded = _recorded_decision(model_root, version)
        if recorded is None:
            judged = _judge(_champion(model_root), metrics, test_records, cfg.batch_size, scratch)
        else:
            log.info("publish: decision for %s already recorded at %s; not judging again", version,
                     recorded["decision"])
            judged = {key: recorded[key] for key in ("eligible", "reason", "new_accuracy", "champion_accuracy",
                                                     "min_accuracy", "margin", "champion_version", "champion_decision")}
    published = {
        **judged,
        "version": version,
        "version_uri": version_uri,
        "model_name": cfg.model_name,
        "dag_id": cfg.dag_id,
        "run_id": cfg.run_id,
        "classes": list(metrics["classes"]),
        "n_test": metrics["n_test"],
        "report_uri": storage.join(version_uri, REPORT_DIR, "index.html"),
        "model_card_uri": storage.join(version_uri, MODEL_CARD_FILE),
        "serving_check": metrics["serving_check"],
        "tflite": tflite_summary(metrics["tflite"]),
    }
    log.info("publish: %s published; %s to promote (%s)", version_uri, "eligible" if published["eligible"] else
             "not eligible", published["reason"])
    storage.write_json(cfg.artifact(artifacts.PUBLISHED), published)
    return published


def promote(cfg: RunConfig, published: dict, approval: dict | None = None) -> dict:
    """Make the published version the champion when it is eligible and, if an approval was asked, approved.

    `published` is publish_version's result. `approval` is what Airflow's
    ApprovalOperator/HITLOperator returned (chosen_options, params_input with the
    reviewer's `comment`, responded_by_user, timedout), or None where the deployment
    asks for no approval; a timed-out request never approves. The decision is recorded
    under promotions/ with who approved or rejected and their comment. `promoted` is
    true only when this call moved the champion.
    """
    model_root = _model_root(cfg.publish_uri, cfg.model_name)
    recorded = _recorded_decision(model_root, published["version"])
    if recorded is not None:
        log.info("promote: decision for %s already recorded at %s; not deciding again", published["version"],
                 recorded["decision"])
        return _finish(cfg, recorded)
    review = read_review(approval)
    champion = _champion(model_root)
    if _unrecorded_promotion_of(model_root, champion, published["version"]):
        log.info("promote: the champion already is %s; recording the decision a crash left out", published["version"])
        decision = _record(model_root, {
            **_decision(cfg, published, review, True, "the champion pointer already names this version (its "
                                                      "decision record was left out by a crash, written now)"),
            "decided_at": champion["promoted_at"], "decision": champion["decision"],
            "champion_version": None, "champion_decision": champion.get("replaces")})
    elif not published["eligible"]:
        decision = _record(model_root, _decision(cfg, published, review, False, published["reason"]))
    elif review is not None and not review["approved"]:
        decision = _record(model_root, _decision(cfg, published, review, False,
                                                 f"{published['reason']}; {verdict(review)}"))
    else:
        decision = _move_champion(cfg, model_root, published, review)
    return _finish(cfg, decision)


def promotion_rule(new_accuracy: float, champion: dict | None, champion_accuracy: float | None,
                   classes: list[str], min_accuracy: float, margin: float, n_test: int) -> tuple[bool, str]:
    """(may be promoted, why): at least the floor, and better than the champion by at least the margin.

    A tie never qualifies, and a champion that predicts other classes cannot be
    compared (`champion_accuracy` is None then): a class change is promoted by hand.
    """
    if new_accuracy < min_accuracy - TOLERANCE:
        return False, (f"{new_accuracy:.4f} on {n_test} test images is below the deployment's floor {min_accuracy} "
                       "(TLP_MIN_ACCURACY)")
    if champion is None:
        return True, "no champion yet"
    if champion_accuracy is None:
        return False, (f"no comparison possible: champion {champion['version']} predicts {champion['classes']}, "
                       f"this run {classes}; not promoted (if the class change is intended, point the champion at "
                       "this version by hand: python -m tasks.steps.publish rollback --version ...)")
    gain = new_accuracy - champion_accuracy
    beats = gain > TOLERANCE and gain >= margin - TOLERANCE
    return beats, (f"{new_accuracy:.4f} vs champion {champion['version']} {champion_accuracy:.4f} on this run's "
                   f"{n_test} test images: gain {gain:+.4f} "
                   + ("beats the champion by at least" if beats else "does not beat the champion by")
                   + f" the margin {margin}")


def tflite_summary(section: dict) -> dict:
    """The TFLite numbers worth showing (report, model card, approval): status and per variant
    accuracy, size, latency and whether it was kept."""
    fields = ("accuracy", "size_bytes", "latency_ms", "kept", "reason")
    return {"status": section["status"],
            "variants": {name: {key: entry[key] for key in fields if key in entry}
                         for name, entry in section["variants"].items()}}


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
    """Point champion.json at another complete version (usually an earlier one), after verifying it again.

    Also the way to promote by hand what the rule cannot compare (a class change).
    Recorded under promotions/ like any decision, with reason "rollback: <reason>",
    once the pointer has moved.
    """
    model_root = _model_root(publish_uri, model_name)
    available = _complete_versions(model_root)
    if version not in available:
        raise PublishError(f"{version!r} is not a complete version of {model_root}; available: "
                           f"{', '.join(available) or 'none (publish a model first)'}")
    version_uri = _version_uri(model_root, version)
    verify_version(version_uri)
    metrics = storage.read_json(storage.join(version_uri, METRICS_FILE))
    pointer.require_conditional_writes(model_root)
    for _ in range(PROMOTE_ATTEMPTS):
        champion, tag = pointer.read(storage.join(model_root, CHAMPION))
        decision = _stamp({
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
        if pointer.write_if(storage.join(model_root, CHAMPION), _pointer(decision, list(metrics["classes"])), tag):
            break
    else:
        raise PublishError(f"{storage.join(model_root, CHAMPION)} moved {PROMOTE_ATTEMPTS} times during the "
                           "rollback (publishes are promoting); run the rollback again")
    _record(model_root, decision)
    log.info("rollback: %s now points at %s (was %s): %s", storage.join(model_root, CHAMPION), version,
             decision["champion_version"], reason)
    return {"version": version, "version_uri": version_uri, "previous_version": decision["champion_version"],
            "reason": decision["reason"], "decision": decision["decision"]}


def list_versions(publish_uri: str, model_name: str) -> list[dict]:
    """Complete versions, oldest first: version, uri, accuracy, created, champion (now), promoted (ever)."""
    model_root = _model_root(publish_uri, model_name)
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
    return _decisions(_model_root(publish_uri, model_name))


def read_champion(publish_uri: str, model_name: str) -> dict | None:
    """The current champion pointer, or None before the first promotion."""
    return _champion(_model_root(publish_uri, model_name))


def _run_inputs(cfg: RunConfig) -> tuple[dict[str, str], str, str]:
    """The version's inputs by name in the version, the golden batch, and the test split: all checked up
    front, so a missing one fails before any upload."""
    *uris, golden, test = artifacts.require(cfg, *INPUTS.values(), artifacts.GOLDEN,
                                            artifacts.split_records(TEST_SPLIT))
    kept = storage.read_json(uris[0]).get("kept", FEATURE_EXTRACTION)
    (model,) = artifacts.require(cfg, artifacts.MODELS[kept])
    return {MODEL_DIR: model, **dict(zip(INPUTS, uris))}, golden, test


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


def _complete_stage(cfg: RunConfig, stage: Path, metrics: dict, golden: Path, test_records: Path,
                    version_uri: str) -> dict:
    """Add what the run root does not hold: the SavedModel export, the run's params, the TFLite variants, and
    the serving check's and TFLite's results in metrics.json (returned). The serving check must pass."""
    model = classifier.load(stage / MODEL_DIR, cfg.cache_dir).model
    model.export(str(stage / SAVED_MODEL_DIR), verbose=False)
    (stage / PARAMS_FILE).write_text(json.dumps(cfg.to_public_dict(), indent=2, sort_keys=True) + "\n")
    checked = serving_check.check_serving(stage / MODEL_DIR, stage / SAVED_MODEL_DIR, golden, test_records,
                                          version_uri)
    variants = tflite_export.export_variants(stage / SAVED_MODEL_DIR, test_records, float(metrics[METRIC]),
                                             stage / TFLITE_DIR)
    metrics = {**metrics, "serving_check": checked, "tflite": variants}
    (stage / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    release = model_card.release_section(metrics)
    with (stage / MODEL_CARD_FILE).open("a", encoding="utf-8") as card:
        card.write("\n\n" + release + "\n")
    report.write_release_page(stage / REPORT_DIR, cfg.model_name, release)
    return metrics


def _upload_verified(stage: Path, version_uri: str) -> None:
    """Hash, upload, read everything back, and only then write checksums.json: the mark of a complete version."""
    checksums = {path.relative_to(stage).as_posix(): storage.sha256_file(path)
                 for path in sorted(stage.rglob("*")) if path.is_file()}
    storage.upload(stage, version_uri)
    verify_version(version_uri, checksums)
    storage.write_json(storage.join(version_uri, CHECKSUMS), checksums)
    log.info("publish: uploaded and verified %d files (%.1f MB) to %s", len(checksums),
             sum(path.stat().st_size for path in stage.rglob("*") if path.is_file()) / 1e6, version_uri)


def _judge(champion: dict | None, metrics: dict, test_records: Path, batch_size: int, scratch: Path) -> dict:
    """The promotion rule applied against this champion, re-scored on this run's test split."""
    policy = settings.load()
    classes = list(metrics["classes"])
    champion_accuracy = None
    if champion is not None and list(champion["classes"]) == classes:
        champion_accuracy = _champion_accuracy(champion, metrics, test_records, batch_size, scratch)
    eligible, reason = promotion_rule(float(metrics[METRIC]), champion, champion_accuracy, classes,
                                      policy.min_accuracy, policy.promotion_margin, metrics["n_test"])
    return {"eligible": eligible, "reason": reason, "new_accuracy": float(metrics[METRIC]),
            "champion_accuracy": champion_accuracy, "min_accuracy": policy.min_accuracy,
            "margin": policy.promotion_margin, **_champion_fields(champion)}


def _move_champion(cfg: RunConfig, model_root: str, published: dict, review: dict | None) -> dict:
    """Write the pointer if it is still the champion the candidate was judged against, and read it back.

    When another promotion (or a rollback) moved it first, the candidate is judged
    again against the new champion; a candidate that no longer qualifies is recorded
    as not promoted, with the reason.
    """
    pointer.require_conditional_writes(model_root)
    champion_uri = storage.join(model_root, CHAMPION)
    judged = published
    with scratch_dir("promote") as scratch:
        for _ in range(PROMOTE_ATTEMPTS):
            champion, tag = pointer.read(champion_uri)
            if _champion_fields(champion)["champion_decision"] != judged["champion_decision"]:
                judged = {**published, **_judge_again(cfg, published, champion, scratch)}
                if not judged["eligible"]:
                    return _record(model_root, _decision(cfg, judged, review, False, (
                        f"the champion moved to {judged['champion_version']} after this candidate was judged; "
                        f"judged again: {judged['reason']}")))
            decision = _decision(cfg, judged, review, True, judged["reason"]
                                 + (f"; {verdict(review)}" if review else ""))
            if pointer.write_if(champion_uri, _pointer(decision, published["classes"]), tag):
                return _record(model_root, _confirmed(champion_uri, decision))
            log.info("promote: %s moved while promoting %s; judging again", champion_uri, published["version"])
    return _record(model_root, _decision(cfg, judged, review, False, (
        f"{champion_uri} moved {PROMOTE_ATTEMPTS} times while this candidate was being promoted; not promoted "
        "(re-run promote to judge it against the champion of then)")))


def _confirmed(champion_uri: str, decision: dict) -> dict:
    """The decision as the pointer read back shows it: promoted only if the pointer names it (or its successor
    replaced it), so a store that let a blind write through shows up as not promoted."""
    now, _ = pointer.read(champion_uri)
    if now is not None and decision["decision"] in (now["decision"], now.get("replaces")):
        return decision
    return {**decision, "promoted": False,
            "reason": f"{decision['reason']}; but {champion_uri} read back names "
                      f"{now['version'] if now else 'nothing'}: another writer overwrote it, so this is not a "
                      "promotion (check that the store honours conditional writes)"}


def _judge_again(cfg: RunConfig, published: dict, champion: dict | None, scratch: Path) -> dict:
    """The rule against a champion that arrived after publish_version judged, on the same test split."""
    metrics = storage.read_json(storage.join(published["version_uri"], METRICS_FILE))
    test_records = scratch / f"{TEST_SPLIT}.tfrecord"
    if not test_records.exists():
        storage.download(cfg.artifact(artifacts.split_records(TEST_SPLIT)), test_records)
    return _judge(champion, metrics, test_records, cfg.batch_size, scratch)


def _unrecorded_promotion_of(model_root: str, champion: dict | None, version: str) -> bool:
    """The pointer names this version through a decision whose record is missing (a crash came in between)."""
    return (champion is not None and champion["version"] == version
            and not storage.exists(storage.join(model_root, champion["decision"])))


def _champion_accuracy(champion: dict, metrics: dict, test_records: Path, batch_size: int, scratch: Path) -> float:
    """The champion's accuracy on this run's test split: recorded, or re-scored through its SavedModel.

    A champion evaluated on the very same selection (equal manifest hash, so the
    same test images) already has that accuracy in its metrics.json; anything else
    is re-scored.
    """
    n_test = metrics["n_test"]
    recorded = storage.read_json(storage.join(champion["uri"], METRICS_FILE))
    selection = metrics.get("manifest_hash")
    if selection is not None and recorded.get("manifest_hash") == selection and recorded.get("n_test") == n_test:
        log.info("publish: champion %s was evaluated on this run's selection (manifest %s): its recorded accuracy "
                 "%.4f on these %d test images stands", champion["version"], selection[:12], recorded[METRIC], n_test)
        return float(recorded[METRIC])
    return _rescored_accuracy(champion, test_records, batch_size, n_test, scratch)


def _rescored_accuracy(champion: dict, test_records: Path, batch_size: int, n_test: int, scratch: Path) -> float:
    """The champion's accuracy on a test split file, through its SavedModel's serving signature.

    The SavedModel serves without the champion's backbone code or cache (a TF Hub
    champion needs no network here), at the champion's own input size.
    """
    import numpy as np
    import tensorflow as tf

    from tasks.records import image_dataset

    path = storage.download(storage.join(champion["uri"], SAVED_MODEL_DIR) + "/", scratch / "champion")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    [(name, spec)] = serve.structured_input_signature[1].items()
    outputs, labels = [], []
    for images, batch_labels in image_dataset(test_records, int(spec.shape[1]), batch_size):
        [probabilities] = serve(**{name: images}).values()
        outputs.append(probabilities.numpy())
        labels.append(batch_labels.numpy())
    probabilities, labels = np.concatenate(outputs), np.concatenate(labels)
    if len(labels) != n_test:
        raise PublishError(f"metrics.json counts {n_test} test images but the test split has {len(labels)}; "
                           "re-run evaluate for this run")
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def _champion_fields(champion: dict | None) -> dict:
    """What a decision records about the champion it was made against."""
    return {"champion_version": champion["version"] if champion else None,
            "champion_decision": champion["decision"] if champion else None}


def _decision(cfg: RunConfig, judged: dict, review: dict | None, promoted: bool, reason: str) -> dict:
    """A publish decision, ready to record: both scores, the rule's numbers and the review."""
    return _stamp({
        "kind": "publish",
        "version": judged["version"],
        "version_uri": judged["version_uri"],
        "run_id": cfg.run_id,
        "promoted": promoted,
        "eligible": judged["eligible"],
        "reason": reason,
        "new_accuracy": judged["new_accuracy"],
        "champion_accuracy": judged["champion_accuracy"],
        "min_accuracy": judged["min_accuracy"],
        "margin": judged["margin"],
        "approval": review,
        "champion_version": judged["champion_version"],
        "champion_decision": judged["champion_decision"],
    })


def _stamp(decision: dict) -> dict:
    """A decision with its metric, time and the key it is recorded under (the pointer names that key)."""
    now = datetime.now(timezone.utc)
    return {**decision, "metric": METRIC, "decided_at": now.isoformat(),
            "decision": f"promotions/{now:%Y%m%dT%H%M%S%fZ}-{decision['version']}.json"}


def _record(model_root: str, decision: dict) -> dict:
    """Write a decision as its own object under promotions/; returns it."""
    storage.write_json(storage.join(model_root, decision["decision"]), decision)
    return decision


def _finish(cfg: RunConfig, decision: dict) -> dict:
    """The promote result from a recorded decision, also written to the run root's publish.json."""
    result = {key: decision.get(key) for key in RESULT_KEYS}
    log.info("promote: %s %s (%s)", result["version_uri"], "promoted" if result["promoted"] else "not promoted",
             result["reason"])
    storage.write_json(cfg.artifact(artifacts.PUBLISHED), result)
    return result


def _recorded_decision(model_root: str, version: str) -> dict | None:
    """The publish decision already made for a version (by an earlier run of this step), if any."""
    found = [d for d in _decisions(model_root, version) if d["kind"] == "publish"]
    return found[-1] if found else None


def _decisions(model_root: str, version: str | None = None) -> list[dict]:
    items = storage.list_files(storage.join(model_root, "promotions") + "/")
    if version is not None:
        items = [item for item in items if item.endswith(f"-{version}.json")]
    return [storage.read_json(item) for item in items]


def _pointer(decision: dict, classes: list[str]) -> dict:
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


def _champion(model_root: str) -> dict | None:
    return pointer.read(storage.join(model_root, CHAMPION))[0]


def _model_root(publish_uri: str, model_name: str) -> str:
    return storage.join(publish_uri, model_name)


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
    """`python -m tasks.steps.publish list|rollback ...`: inspect versions or move the champion back by hand."""
    parser = argparse.ArgumentParser(prog="python -m tasks.steps.publish", description=main.__doc__)
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
