"""Step 6: choose the run's model and score it on the held-out test split.

select hands over the winner's feature-extraction model and fine_tune its
fine-tuned one (nothing when the branch skipped it); the run keeps the
fine-tuned model only when it beat feature extraction on validation. The test
split is used here and nowhere else, so these numbers are the honest estimate
of how the model does on unseen images. metrics.json keeps the same keys every
run (publish compares runs by it); the report and the model card are the
human-readable views of the same numbers.
"""
from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pandas as pd

from tasks import accuracy_gap, artifacts, model_card, phases, report, serving_check, storage
from tasks.config import RunConfig
from tasks.errors import EvaluationError
from tasks.model_card import RunRecord
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE
from tasks.predict import predict_splits
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

MOST_CONFUSED_PAIRS = 10
PROBABILITY_FLOOR = 1e-7  # Keras' epsilon: a confident wrong answer costs a large but finite loss


def evaluate(cfg: RunConfig, data: dict[str, Any], best: dict[str, Any], tuned: dict[str, Any] | None) -> dict:
    """Keep the better of the models select (`best`) and fine_tune (`tuned`, None when skipped) handed over,
    predict the test split of the subsample handed over (`data`) with it; write metrics, report and model card.

    Returns the headline numbers, which model was kept, and where the outputs are.
    """
    from tasks import classifier  # Keras: the metrics below are plain numpy, and tested without it
    record, models = _load_record(cfg, data, best, tuned)
    model_uri = models[record.kept]
    test_uri, val_uri = artifacts.require(cfg, artifacts.split_records("test"), artifacts.split_records("val"))
    classes = list(record.manifest["classes"])
    with scratch_dir("evaluate") as scratch:
        model = classifier.fetch(model_uri, scratch, cfg.cache_dir).model
        test_path = storage.download(test_uri, scratch / "test.tfrecord")
        val_path = storage.download(val_uri, scratch / "val.tfrecord")
        (probabilities, labels, paths), (val_probabilities, val_labels, _) = predict_splits(
            model, [test_path, val_path], cfg.batch_size)
        storage.write_bytes(cfg.artifact(artifacts.GOLDEN),
                            serving_check.golden_batch(probabilities, paths, int(model.input_shape[1])))
        storage.write_bytes(cfg.artifact(artifacts.EVALUATED_PREDICTIONS), predictions_file(probabilities, paths))

        metrics = classification_metrics(probabilities, labels, classes, cfg.top_k)
        confusion = np.asarray(metrics["confusion_matrix"])
        pairs = confusion_pairs(confusion, classes, confusion.size)
        metrics["most_confused_pairs"] = pairs[:MOST_CONFUSED_PAIRS]
        metrics["manifest_hash"] = record.manifest["hash"]
        metrics["kept"] = record.kept
        metrics["validation_vs_test"] = accuracy_gap.compare(
            float(np.mean(val_probabilities.argmax(axis=1) == val_labels)), len(val_labels), metrics["accuracy"],
            metrics["n_test"], (record.manifest.get("test_source") or {}).get("source"))

        predictions = predictions_table(probabilities, labels, paths, classes)
        wrong = most_wrong(predictions, len(predictions))
        card = model_card.render(cfg, metrics, record)
        report_dir = report.write_report(scratch / "report", cfg, metrics, record, predictions=predictions,
                                         wrong=wrong, pairs=pairs, test_records=test_path, model_card=card)
        storage.upload(report_dir, cfg.artifact(artifacts.REPORT))
    storage.write_text(cfg.artifact(artifacts.MODEL_CARD), card)
    storage.write_json(cfg.artifact(artifacts.METRICS), metrics)

    result = {
        "accuracy": metrics["accuracy"],
        "top_k": metrics["top_k_accuracy"]["k"],
        "top_k_accuracy": metrics["top_k_accuracy"]["value"],
        "macro_f1": metrics["macro_avg"]["f1"],
        "n_test": metrics["n_test"],
        "n_wrong": len(wrong),
        "worst_class": model_card.worst_classes(metrics, 1)[0],
        "kept": record.kept,
        "model_uri": model_uri,
        "metrics_uri": cfg.artifact(artifacts.METRICS),
        "report_uri": cfg.artifact(artifacts.REPORT, artifacts.REPORT_PAGE),
        "model_card_uri": cfg.artifact(artifacts.MODEL_CARD),
        "golden_uri": cfg.artifact(artifacts.GOLDEN),
        "predictions_uri": cfg.artifact(artifacts.EVALUATED_PREDICTIONS),
    }
    log.info("evaluate: %s model %s: accuracy %.4f, top-%d %.4f, macro F1 %.4f on %d test images (%d wrong, worst "
             "class %s); wrote %s", record.kept, model_uri, result["accuracy"], result["top_k"],
             result["top_k_accuracy"], result["macro_f1"], result["n_test"], result["n_wrong"],
             result["worst_class"], result["metrics_uri"])
    return result


def predictions_file(probabilities: np.ndarray, paths: list[str]) -> bytes:
    """Every test record's path and probability row, in file order: publish judges the candidate by these answers
    once the published model is shown to give them (tasks/steps/publish_version.py)."""
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.asarray(paths, dtype=str), probabilities=np.asarray(probabilities, dtype=np.float32))
    return buffer.getvalue()


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes: list[str],
                           top_k: int) -> dict:
    """Accuracy, top-k, loss, per-class and averaged precision/recall/F1 and the confusion matrix.

    `top_k_accuracy` is {"k", "value"} with k capped at the number of classes, so
    runs with different class counts are never compared on different k unawares.
    A class that is never predicted (or never present) scores 0, not NaN, so the
    JSON stays valid and the averages stay defined.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, n_classes = probabilities.shape
    if n_classes != len(classes):
        raise EvaluationError(f"the model outputs {n_classes} class probabilities but the manifest lists "
                              f"{len(classes)} classes {classes}; evaluate the model trained on this run's data")
    if labels.shape != (n,) or n == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise EvaluationError(f"test labels must be {n} integers in [0, {n_classes}); got shape {labels.shape}; "
                              "re-run subsample to rewrite the test records")
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)

    true_positives = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = _ratio(true_positives, confusion.sum(axis=0))
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * precision * recall, precision + recall)

    k = min(top_k, n_classes)
    top_k_hits = (np.argsort(-probabilities, axis=1, kind="stable")[:, :k] == labels[:, None]).any(axis=1)
    true_probability = probabilities[np.arange(n), labels]
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "top_k_accuracy": {"k": k, "value": float(np.mean(top_k_hits))},
        "loss": float(-np.mean(np.log(np.clip(true_probability, PROBABILITY_FLOOR, 1.0)))),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "macro_avg": _average(precision, recall, f1, np.ones(n_classes), n),
        "weighted_avg": _average(precision, recall, f1, support, n),
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
        "n_test": int(n),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def _average(precision: np.ndarray, recall: np.ndarray, f1: np.ndarray, weights: np.ndarray, n: int) -> dict:
    return {"precision": float(np.average(precision, weights=weights)),
            "recall": float(np.average(recall, weights=weights)),
            "f1": float(np.average(f1, weights=weights)), "support": int(n)}


def predictions_table(probabilities: np.ndarray, labels: np.ndarray, paths: list[str],
                      classes: list[str]) -> pd.DataFrame:
    """One row per test image, indexed by its position in the test records."""
    rows = np.arange(len(labels))
    predicted = probabilities.argmax(axis=1)
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({
        "path": list(paths),
        "true": names[labels],
        "predicted": names[predicted],
        "predicted_probability": probabilities[rows, predicted].astype(np.float64),
        "true_probability": probabilities[rows, labels].astype(np.float64),
        "correct": predicted == labels,
    })


def most_wrong(predictions: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k wrong predictions the model was surest of, surest first (ties by path).

    These are the first rows to look at: label noise, look-alike classes, or a
    shortcut the model learned.
    """
    wrong = predictions[~predictions["correct"].astype(bool)]
    ordered = wrong.sort_values(["predicted_probability", "path"], ascending=[False, True], kind="stable")
    return ordered.head(k)


def confusion_pairs(confusion: np.ndarray, classes: list[str], top: int) -> list[dict]:
    """The `top` most frequent (true -> predicted) mistakes, most frequent first.

    `share` is the fraction of the true class's test images that went to the
    predicted class. Ties keep class order, so the list is the same every run.
    """
    confusion = np.asarray(confusion)
    support = confusion.sum(axis=1)
    pairs = [
        {"true": classes[t], "predicted": classes[p], "count": int(count), "share": float(count / support[t])}
        for (t, p), count in np.ndenumerate(confusion) if t != p and count > 0
    ]
    pairs.sort(key=lambda pair: -pair["count"])
    return pairs[:top]


def _load_record(cfg: RunConfig, data: dict[str, Any], best: dict[str, Any],
                 tuned: dict[str, Any] | None) -> tuple[RunRecord, dict[str, str]]:
    """What the earlier steps handed over (checked to be this run's artifacts), and the model URI of each phase."""
    manifest = artifacts.read_manifest(cfg, data)
    summaries = {FEATURE_EXTRACTION: phases.read_summary(
        artifacts.arrived(cfg, best.get("summary_uri"), artifacts.TRAIN_SUMMARY))}
    models = {FEATURE_EXTRACTION: artifacts.arrived(cfg, best.get("model_uri"), artifacts.FEATURE_EXTRACTION_MODEL)}
    history = phases.read_history(artifacts.arrived(cfg, best.get("history_uri"), artifacts.HISTORY))
    tuned_history = None
    if tuned:
        summaries[FINE_TUNE] = phases.read_summary(
            artifacts.arrived(cfg, tuned.get("summary_uri"), artifacts.FINE_TUNE_SUMMARY))
        models[FINE_TUNE] = artifacts.arrived(cfg, tuned.get("model_uri"), artifacts.FINE_TUNED_MODEL)
        tuned_history = phases.read_history(
            artifacts.arrived(cfg, tuned.get("history_uri"), artifacts.FINE_TUNE_HISTORY))
    leaderboard_uri = artifacts.arrived(cfg, best.get("leaderboard_uri"), artifacts.LEADERBOARD)
    record = RunRecord(
        manifest=manifest,
        history=phases.curves(history, tuned_history),
        decision=_read_optional(cfg.artifact(artifacts.DECISION)),
        phases=summaries,
        kept=phases.kept_phase(summaries[FEATURE_EXTRACTION], summaries.get(FINE_TUNE)),
        leaderboard=storage.read_json(leaderboard_uri),
        changes=_read_optional(cfg.artifact(artifacts.CHANGES)),
    )
    return record, models


def _read_optional(uri: str) -> dict | None:
    if storage.exists(uri):
        return storage.read_json(uri)
    log.info("evaluate: %s not found; the report and model card will say it was not recorded", uri)
    return None
