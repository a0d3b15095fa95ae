"""Whether a candidate may replace the champion: the rule, the judging against a champion, and moving the pointer.

The rule: at least the deployment's floor (settings.min_accuracy) and better than the champion,
re-scored on the candidate run's test split, by at least settings.promotion_margin.

Two publishes of one model may promote at once. The pointer is written only if it is still
the one the candidate was judged against; the loser of that race reads the new champion,
judges the candidate again against it (re-scoring it on its own test split), and either
tries again or records why not. The pointer is then read back, and the decision is recorded
only after that, so no result, publish.json or record claims a promotion that did not
happen.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tasks import artifacts, pointer, registry, settings, storage
from tasks.approval import verdict
from tasks.config import RunConfig
from tasks.errors import PublishError
from tasks.registry import CHAMPION, METRIC, METRICS_FILE, PROMOTE_ATTEMPTS, SAVED_MODEL_DIR
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

TEST_SPLIT = "test"
TOLERANCE = 1e-9  # accuracies are ratios of counts: absorb float error when comparing against the margin


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
                       "this version by hand: python -m tasks.registry rollback --version ...)")
    gain = new_accuracy - champion_accuracy
    beats = gain > TOLERANCE and gain >= margin - TOLERANCE
    return beats, (f"{new_accuracy:.4f} vs champion {champion['version']} {champion_accuracy:.4f} on this run's "
                   f"{n_test} test images: gain {gain:+.4f} "
                   + ("beats the champion by at least" if beats else "does not beat the champion by")
                   + f" the margin {margin}")


def judge(champion: dict | None, metrics: dict, test_records: Path, batch_size: int, scratch: Path) -> dict:
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
            "margin": policy.promotion_margin, **registry.champion_fields(champion)}


def move_champion(cfg: RunConfig, model_root: str, published: dict, review: dict | None) -> dict:
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
            if registry.champion_fields(champion)["champion_decision"] != judged["champion_decision"]:
                judged = {**published, **_judge_again(cfg, published, champion, scratch)}
                if not judged["eligible"]:
                    return registry.record(model_root, decision_for(cfg, judged, review, False, (
                        f"the champion moved to {judged['champion_version']} after this candidate was judged; "
                        f"judged again: {judged['reason']}")))
            decision = decision_for(cfg, judged, review, True, judged["reason"]
                                    + (f"; {verdict(review)}" if review else ""))
            if pointer.write_if(champion_uri, registry.pointer_for(decision, published["classes"]), tag):
                return registry.record(model_root, _confirmed(champion_uri, decision))
            log.info("promote: %s moved while promoting %s; judging again", champion_uri, published["version"])
    return registry.record(model_root, decision_for(cfg, judged, review, False, (
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
    return judge(champion, metrics, test_records, cfg.batch_size, scratch)


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
    from tasks.savedmodel_scan import check_saved_model

    path = storage.download(storage.join(champion["uri"], SAVED_MODEL_DIR) + "/", scratch / "champion")
    check_saved_model(path, f"the champion's SavedModel {champion['uri']}")
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


def decision_for(cfg: RunConfig, judged: dict, review: dict | None, promoted: bool, reason: str) -> dict:
    """A publish decision, ready to record: both scores, the rule's numbers and the review."""
    return registry.stamp({
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


