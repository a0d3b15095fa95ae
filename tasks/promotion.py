"""Whether a candidate may replace the champion: the ground it is judged on, the rule, and moving the pointer.

**Ground the candidate does not choose.** Candidate and champion are scored, image by image, on the same
test images: the deployment's own evaluation set for the model when one is configured
(settings.evaluation_set, TLP_EVALUATION_SETS), otherwise the candidate run's test split together with
the champion's own test split (kept in its version as `test/test.tfrecord`; identical images counted
once). Whoever triggers a run shapes its own test split (source, classes, test percentage, seed), but not
the evaluation set nor the champion's test images.

**The rule** (`promotion_rule`), all of:
- at least settings.min_test_images judged images (TLP_MIN_TEST_IMAGES);
- accuracy at least the floor settings.min_accuracy (TLP_MIN_ACCURACY);
- against a champion: a gain of at least the minimum effect settings.promotion_margin
  (TLP_PROMOTION_MARGIN) AND a paired test on the same images saying the gain is unlikely to be
  noise: McNemar's exact test (mid-p, one-sided) on the images exactly one of the two models gets
  right, p at most settings.promotion_alpha (TLP_PROMOTION_ALPHA). The gain's 95 % interval
  (Agresti-Min adjusted Wald, paired) is recorded with it.
A champion that predicts other classes cannot be compared: a class change is promoted by hand.

Why these defaults (min effect 0.01, alpha 0.05, 1,000 images): on the demo (Fashion-MNIST, 10,000 test
images, accuracy ~0.913, so ~870 errors per model) two runs of the same recipe with different seeds share
most of their errors. Measured on a proxy of the feature-extraction phase (a dense head trained with
dropout on fixed features of Fashion-MNIST, 4 seeds, accuracy ~0.861): the two models of a pair disagree
in correctness on 490-755 of the 10,000 images, gains were at most 0.0019 and p at least 0.22. With
b + c ~ 400-750 discordant images and no real difference the gain (b - c) / n has a standard deviation of
sqrt(b + c) / n ~ 0.002-0.003: a gain of 0.01 is 3.5-5 of those (chance well under 0.1 %), while a real
one-point improvement gives b - c ~ 100 and p < 1e-4. With a minimum effect of 0 and alpha 0.05, one seed
would replace another about one try in twenty.

Two publishes of one model may promote at once. The pointer is written only if it is still
the one the candidate was judged against; the loser of that race reads the new champion,
judges the candidate again against it, and either tries again or records why not. The pointer
is then read back, and the decision is recorded only after that, so no result, publish.json or
record claims a promotion that did not happen.

The rule, the paired test, the records and moving the pointer need no TensorFlow; only scoring a
model on images (`score_missing`, `judging_set`) imports it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks import pointer, registry, settings, storage
from tasks.approval import verdict
from tasks.errors import PublishError
from tasks.registry import CHAMPION, PREDICTIONS_FILE, PROMOTE_ATTEMPTS, SAVED_MODEL_DIR, TEST_RECORDS

log = logging.getLogger(__name__)

TEST_SPLIT = "test"
TOLERANCE = 1e-9  # accuracies are ratios of counts: absorb float error when comparing against the margin
PAIRED_TEST = "McNemar exact mid-p, one-sided"
INTERVAL_Z = 1.959964  # 95 %
# what a judgement records and a decision repeats: the rule's inputs and verdict
JUDGED_KEYS = ("eligible", "reason", "new_accuracy", "champion_accuracy", "gain", "gain_interval", "p_value",
               "n_test", "paired_test", "judged_on", "min_accuracy", "margin", "alpha", "min_test_images",
               "champion_version", "champion_decision")


@dataclass(frozen=True)
class Policy:
    """The deployment's promotion policy (settings), as the rule reads it."""

    min_accuracy: float
    margin: float
    alpha: float
    min_test_images: int

    @classmethod
    def from_settings(cls, deployment: settings.Settings | None = None) -> Policy:
        deployment = deployment or settings.load()
        return cls(deployment.min_accuracy, deployment.promotion_margin, deployment.promotion_alpha,
                   deployment.min_test_images)


def paired_comparison(candidate_correct: list[bool], champion_correct: list[bool]) -> dict:
    """Candidate against champion on the same images: gain in accuracy, its 95 % interval, McNemar's p.

    Only the images exactly one model gets right carry information (b: candidate only, c: champion
    only). p is the one-sided exact mid-p of b or more out of b + c fair coin flips; the interval is
    the Agresti-Min adjusted Wald interval for a paired difference of proportions.
    """
    if len(candidate_correct) != len(champion_correct) or not candidate_correct:
        raise ValueError(f"paired comparison needs both models' answers on the same images "
                         f"(got {len(candidate_correct)} and {len(champion_correct)})")
    n = len(candidate_correct)
    b = sum(1 for new, old in zip(candidate_correct, champion_correct, strict=True) if new and not old)
    c = sum(1 for new, old in zip(candidate_correct, champion_correct, strict=True) if old and not new)
    b_adj, c_adj, n_adj = b + 0.5, c + 0.5, n + 2
    centre = (b_adj - c_adj) / n_adj
    spread = INTERVAL_Z * math.sqrt(max((b_adj + c_adj) - (b_adj - c_adj) ** 2 / n_adj, 0.0)) / n_adj
    return {"gain": (b - c) / n, "gain_interval": [max(centre - spread, -1.0), min(centre + spread, 1.0)],
            "p_value": mcnemar_mid_p(b, c), "n_test": n, "paired_test": PAIRED_TEST,
            "candidate_only_right": b, "champion_only_right": c}


def mcnemar_mid_p(b: int, c: int) -> float:
    """One-sided exact mid-p that the candidate is no better: P(X > b) + P(X = b) / 2, X ~ Binomial(b + c, 1/2)."""
    m = b + c
    above = sum(math.comb(m, k) for k in range(b + 1, m + 1))
    return (above + math.comb(m, b) / 2) / 2 ** m


def promotion_rule(accuracy: float, n_test: int, champion: dict | None, comparison: dict | None,
                   not_comparable: str, policy: Policy, judged_on: str) -> tuple[bool, str]:
    """(may be promoted, why). `comparison` is paired_comparison's result against `champion` (None when there is
    no champion, or when it cannot be compared: then `not_comparable` says why)."""
    if n_test < policy.min_test_images:
        return False, (f"judged on {n_test} test images ({judged_on}), fewer than the deployment's minimum "
                       f"{policy.min_test_images} (TLP_MIN_TEST_IMAGES): too few to tell a better model from luck")
    if accuracy < policy.min_accuracy - TOLERANCE:
        return False, (f"{accuracy:.4f} on {n_test} test images ({judged_on}) is below the deployment's floor "
                       f"{policy.min_accuracy} (TLP_MIN_ACCURACY)")
    if champion is None:
        return True, f"no champion yet ({accuracy:.4f} on {n_test} test images: {judged_on})"
    if comparison is None:
        return False, (f"no comparison possible: {not_comparable}; not promoted (if the change is intended, point "
                       "the champion at this version by hand: python -m tasks.registry rollback --version ...)")
    gain, (low, high), p_value = comparison["gain"], comparison["gain_interval"], comparison["p_value"]
    beats = (gain > TOLERANCE and gain >= policy.margin - TOLERANCE and p_value <= policy.alpha + TOLERANCE)
    said = (f"{accuracy:.4f} vs champion {champion['version']} {accuracy - gain:.4f} on the same {n_test} test "
            f"images ({judged_on}): gain {gain:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}], p = {p_value:.3g} "
            f"({PAIRED_TEST}); ")
    if beats:
        return True, said + (f"beats the champion by at least the minimum effect {policy.margin} with p <= "
                             f"{policy.alpha}")
    return False, said + (f"does not beat the champion: that needs a gain of at least the minimum effect "
                          f"{policy.margin} (TLP_PROMOTION_MARGIN) and p <= {policy.alpha} (TLP_PROMOTION_ALPHA)")


def judge_predictions(labels: dict[str, str], candidate: dict[str, str], champion: dict | None,
                      champion_predictions: dict[str, str] | None, not_comparable: str, policy: Policy,
                      judged_on: str) -> dict:
    """The rule on per-image predictions: `labels`, `candidate` and `champion_predictions` map each judged image
    (its sha256) to a class name. Returns the judgement's fields (JUDGED_KEYS)."""
    images = sorted(labels)
    missing = [image for image in images if image not in candidate]
    if missing:
        raise PublishError(f"the candidate has no prediction for {len(missing)} of the {len(images)} judged images")
    candidate_correct = [candidate[image] == labels[image] for image in images]
    accuracy = sum(candidate_correct) / len(images) if images else 0.0
    comparison = None
    if champion is not None and champion_predictions is not None:
        comparison = paired_comparison(candidate_correct,
                                       [champion_predictions.get(image) == labels[image] for image in images])
    eligible, reason = promotion_rule(accuracy, len(images), champion, comparison, not_comparable, policy,
                                      judged_on)
    stats = comparison or {"gain": None, "gain_interval": None, "p_value": None, "paired_test": None}
    return {"eligible": eligible, "reason": reason, "new_accuracy": accuracy,
            "champion_accuracy": None if comparison is None else accuracy - comparison["gain"],
            "gain": stats["gain"], "gain_interval": stats["gain_interval"], "p_value": stats["p_value"],
            "n_test": len(images), "paired_test": stats["paired_test"], "judged_on": judged_on,
            "min_accuracy": policy.min_accuracy, "margin": policy.margin, "alpha": policy.alpha,
            "min_test_images": policy.min_test_images, **registry.champion_fields(champion)}


@dataclass
class JudgingSet:
    """The images a candidate is judged on: sha256 -> (encoded image, class name, path), and what they are."""

    images: dict[str, tuple[bytes, str, str]]
    judged_on: str
    not_comparable: str  # why the champion cannot be compared on them ("" when it can)


def judging_set(classes: list[str], test_records: Path, champion: dict | None, evaluation_set: str | None,
                scratch: Path) -> JudgingSet:
    """The deployment's evaluation set for the model if there is one, else the candidate's test split and the
    champion's own (identical images once)."""
    from tasks.records import iter_records

    if champion is not None and list(champion["classes"]) != list(classes):
        not_comparable = f"champion {champion['version']} predicts {champion['classes']}, this run {list(classes)}"
    else:
        not_comparable = ""
    if evaluation_set:
        images = _evaluation_images(evaluation_set)
        unknown = sorted({name for _, name, _ in images.values()} - set(classes))
        if unknown:
            not_comparable = not_comparable or f"the deployment's evaluation set has classes {unknown} this model " \
                                               "does not predict"
            images = {key: value for key, value in images.items() if value[1] in classes}
        return JudgingSet(images, f"the deployment's evaluation set {evaluation_set}", not_comparable)
    images = {}
    for image, label, path in iter_records(test_records):
        images.setdefault(_digest(image), (image, classes[label], path))
    judged_on = "this run's test split"
    if champion is not None and not not_comparable:
        theirs = storage.join(champion["uri"], TEST_RECORDS)
        if storage.exists(theirs):
            before = len(images)
            for image, label, path in iter_records(storage.download(theirs, scratch / "champion-test.tfrecord")):
                images.setdefault(_digest(image), (image, champion["classes"][label], path))
            judged_on = (f"this run's test split and champion {champion['version']}'s "
                         f"({len(images) - before} of its images not in this run's)")
        else:
            judged_on += f" (champion {champion['version']} keeps no test split of its own)"
    return JudgingSet(images, judged_on, not_comparable)


def score_missing(saved_model: Path | str, classes: list[str], judged: JudgingSet, known: dict[str, str],
                  batch_size: int, scratch: Path) -> dict[str, str]:
    """Predictions (sha256 -> class name) for every judged image: `known` ones kept, the others scored through the
    SavedModel's serving signature (the model's own input size; no backbone code or cache needed)."""
    missing = [key for key in sorted(judged.images) if key not in known]
    predictions = {key: known[key] for key in judged.images if key in known}
    if not missing:
        return predictions
    import numpy as np
    import tensorflow as tf

    from tasks.records import image_dataset, write_records
    from tasks.savedmodel_scan import check_saved_model

    path = saved_model
    if isinstance(saved_model, str):  # a version's, in the store: scanned before it is loaded
        local = scratch / f"saved-model-{_digest(saved_model.encode())[:12]}"
        path = storage.download(saved_model.rstrip("/") + "/", local)
        check_saved_model(path, f"the SavedModel {saved_model}")
    records = scratch / "to-score.tfrecord"
    write_records(records, ((judged.images[key][0], 0, judged.images[key][2]) for key in missing))
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    [(name, spec)] = serve.structured_input_signature[1].items()
    predicted = []
    for images, _ in image_dataset(records, int(spec.shape[1]), batch_size):
        [probabilities] = serve(**{name: images}).values()
        predicted.append(np.argmax(probabilities.numpy(), axis=1))
    for key, index in zip(missing, np.concatenate(predicted), strict=False):
        predictions[key] = classes[int(index)]
    return predictions


def judge(champion: dict | None, classes: list[str], candidate_saved_model: Path | str,
          candidate_known: dict[str, str], test_records: Path, evaluation_set: str | None, batch_size: int,
          scratch: Path) -> tuple[dict, dict[str, str]]:
    """Score candidate and champion on the judging set and apply the rule: (judgement, the candidate's predictions
    by image)."""
    judged = judging_set(classes, test_records, champion, evaluation_set, scratch)
    candidate = score_missing(candidate_saved_model, classes, judged, candidate_known, batch_size, scratch)
    champion_predictions = None
    if champion is not None and not judged.not_comparable:
        champion_predictions = score_missing(storage.join(champion["uri"], SAVED_MODEL_DIR), list(champion["classes"]),
                                             judged, recorded_predictions(champion["uri"]), batch_size, scratch)
    labels = {key: name for key, (_, name, _) in judged.images.items()}
    judgement = judge_predictions(labels, candidate, champion, champion_predictions, judged.not_comparable,
                                  Policy.from_settings(), judged.judged_on)
    log.info("promotion: %s", judgement["reason"])
    return judgement, candidate


def recorded_predictions(version_uri: str) -> dict[str, str]:
    """A version's own per-image predictions (sha256 -> class name), or {} for a version that keeps none."""
    uri = storage.join(version_uri, PREDICTIONS_FILE)
    return storage.read_json(uri)["predictions"] if storage.exists(uri) else {}


def card_section(judgement: dict) -> str:
    """The model card's promotion section: what the candidate was judged on and the verdict, with its noise."""
    lines = ["## Promotion", "",
             f"Judged on {judgement['n_test']} test images: {judgement['judged_on']}. "
             f"Accuracy {judgement['new_accuracy']:.4f}."]
    if judgement["gain"] is not None:
        low, high = judgement["gain_interval"]
        lines.append(f"Against champion `{judgement['champion_version']}` ({judgement['champion_accuracy']:.4f} on the "
                     f"same images): gain {judgement['gain']:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}], "
                     f"p = {judgement['p_value']:.3g} ({judgement['paired_test']}).")
    lines += ["", f"Verdict at publishing: **{'eligible' if judgement['eligible'] else 'not eligible'}** for "
              f"promotion: {judgement['reason']}. Rule: at least {judgement['min_test_images']} images, accuracy at "
              f"least {judgement['min_accuracy']}, a gain of at least {judgement['margin']} with p <= "
              f"{judgement['alpha']}."]
    return "\n".join(lines)


def move_champion(model_root: str, judged: dict, review: dict | None, rejudge: Callable[[dict | None], dict]) -> dict:
    """Write the pointer if it is still the champion the candidate was judged against, and read it back.

    When another promotion (or a rollback) moved it first, `rejudge` judges the candidate again against
    the new champion; a candidate that no longer qualifies is recorded as not promoted, with the reason.
    """
    pointer.require_conditional_writes(model_root)
    champion_uri = storage.join(model_root, CHAMPION)
    for _ in range(PROMOTE_ATTEMPTS):
        champion, tag = pointer.read(champion_uri)
        if registry.champion_fields(champion)["champion_decision"] != judged["champion_decision"]:
            judged = {**judged, **rejudge(champion)}
            if not judged["eligible"]:
                return registry.record(model_root, decision_for(judged, review, False, (
                    f"the champion moved to {judged['champion_version']} after this candidate was judged; "
                    f"judged again: {judged['reason']}")))
        decision = decision_for(judged, review, True, judged["reason"] + (f"; {verdict(review)}" if review else ""))
        if pointer.write_if(champion_uri, registry.pointer_for(decision, judged["classes"]), tag):
            return registry.record(model_root, _confirmed(champion_uri, decision))
        log.info("promote: %s moved while promoting %s; judging again", champion_uri, judged["version"])
    return registry.record(model_root, decision_for(judged, review, False, (
        f"{champion_uri} moved {PROMOTE_ATTEMPTS} times while this candidate was being promoted; not promoted "
        "(re-run promote to judge it against the champion of then)")))


def decision_for(judged: dict, review: dict | None, promoted: bool, reason: str) -> dict:
    """A publish decision, ready to record: the judgement (scores, paired test, the rule's numbers) and the review."""
    return registry.stamp({
        "kind": "publish",
        "version": judged["version"],
        "version_uri": judged["version_uri"],
        "run_id": judged["run_id"],
        "promoted": promoted,
        **{key: judged.get(key) for key in JUDGED_KEYS},
        "reason": reason,
        "approval": review,
    })


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


def _evaluation_images(uri: str) -> dict[str, tuple[bytes, str, str]]:
    """The deployment's evaluation set: every file under `<uri>/<class>/`, by content."""
    base = uri.rstrip("/")
    images: dict[str, tuple[bytes, str, str]] = {}
    for item in storage.list_files(base + "/"):
        relative = item[len(base) + 1:]
        name, sep, _ = relative.partition("/")
        if sep and not relative.split("/")[-1].startswith("."):
            data = storage.read_bytes(item)
            images.setdefault(_digest(data), (data, name, relative))
    if not images:
        raise PublishError(f"the deployment's evaluation set {uri} holds no images (expected {base}/<class>/<image>); "
                           "fix TLP_EVALUATION_SETS")
    return images


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def predictions_document(predictions: dict[str, str], judged_on: str) -> str:
    """The version's predictions.json: its per-image answers on the images it was judged on."""
    return json.dumps({"judged_on": judged_on, "predictions": dict(sorted(predictions.items()))}, indent=1) + "\n"

