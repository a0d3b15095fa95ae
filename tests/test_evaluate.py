"""Evaluate: hand-checked metrics, the most-wrong table, and whole runs on a local and an S3 run root."""
from __future__ import annotations

import html
import io
import math
import re

import numpy as np
import pandas as pd
import pytest

from tasks import artifacts, classifier, storage
from tasks.errors import MissingInputError
from tasks.steps.evaluate import (
    EvaluationError,
    classification_metrics,
    confusion_pairs,
    evaluate,
    most_wrong,
    predictions_table,
)
from tests.helpers import evaluation as fx

METRICS_KEYS = {"accuracy", "top_k_accuracy", "loss", "per_class", "macro_avg", "weighted_avg", "confusion_matrix",
                "classes", "n_test", "manifest_hash", "most_confused_pairs", "kept",
                "validation_vs_test"}
REPORT_FILES = {"index.html", "confusion_matrix.png", "curves.png", "predictions.csv", "most_wrong.csv"}

# Six images, three classes: one apple taken for banana, one banana for cherry.
LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBABILITIES = np.array([
    [0.7, 0.2, 0.1],
    [0.5, 0.3, 0.2],
    [0.2, 0.7, 0.1],
    [0.1, 0.8, 0.1],
    [0.35, 0.05, 0.6],
    [0.1, 0.2, 0.7],
])
ABC = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def colour_classifier(monkeypatch):
    """Evaluate the hand-checkable colour model instead of a rebuilt backbone classifier."""
    monkeypatch.setattr(classifier, "fetch", fx.fetch_colour_model)


def test_metrics_match_hand_computed_values():
    metrics = classification_metrics(PROBABILITIES, LABELS, ABC, top_k=2)

    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["top_k_accuracy"] == {"k": 2, "value": pytest.approx(5 / 6)}
    true_probabilities = [0.7, 0.5, 0.2, 0.8, 0.05, 0.7]
    assert metrics["loss"] == pytest.approx(-sum(math.log(p) for p in true_probabilities) / 6)
    expected = {"a": (1.0, 2 / 3, 0.8, 3), "b": (0.5, 0.5, 0.5, 2), "c": (0.5, 1.0, 2 / 3, 1)}
    for name, (precision, recall, f1, support) in expected.items():
        assert metrics["per_class"][name] == {"precision": pytest.approx(precision), "recall": pytest.approx(recall),
                                              "f1": pytest.approx(f1), "support": support}
    assert metrics["macro_avg"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(13 / 18),
                                    "f1": pytest.approx((0.8 + 0.5 + 2 / 3) / 3), "support": 6}
    assert metrics["weighted_avg"] == {"precision": pytest.approx(0.75), "recall": pytest.approx(4 / 6),
                                       "f1": pytest.approx((3 * 0.8 + 2 * 0.5 + 2 / 3) / 6), "support": 6}
    assert metrics["classes"] == ABC and metrics["n_test"] == 6


def test_never_predicted_class_scores_zero_not_nan_and_top_k_is_capped():
    labels = np.array([0, 1, 2])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]])
    metrics = classification_metrics(probabilities, labels, ABC, top_k=5)

    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["top_k_accuracy"] == {"k": 3, "value": 1.0}
    assert math.isfinite(metrics["loss"])


def test_class_count_mismatch_names_both_sides():
    with pytest.raises(EvaluationError, match=r"outputs 3 class probabilities but the manifest lists 2"):
        classification_metrics(PROBABILITIES, LABELS, ["a", "b"], top_k=1)


def test_confusion_pairs_rank_mistakes_by_count_in_class_order():
    confusion = np.array([[5, 3, 0], [1, 6, 3], [0, 2, 7]])
    pairs = confusion_pairs(confusion, ABC, top=3)

    assert pairs == [
        {"true": "a", "predicted": "b", "count": 3, "share": pytest.approx(3 / 8)},
        {"true": "b", "predicted": "c", "count": 3, "share": pytest.approx(3 / 10)},
        {"true": "c", "predicted": "b", "count": 2, "share": pytest.approx(2 / 9)},
    ]
    assert len(confusion_pairs(confusion, ABC, top=100)) == 4
    assert confusion_pairs(np.diag([2, 2, 2]), ABC, top=5) == []


def test_most_wrong_keeps_only_wrong_rows_surest_first():
    predictions = predictions_table(PROBABILITIES, LABELS, [f"img{i}.jpg" for i in range(6)], ABC)
    extra = pd.DataFrame([{"path": "tie.jpg", "true": "a", "predicted": "b", "predicted_probability": 0.7,
                           "true_probability": 0.2, "correct": False}], index=[6])
    predictions = pd.concat([predictions, extra])

    wrong = most_wrong(predictions, k=10)

    assert list(wrong["path"]) == ["img2.jpg", "tie.jpg", "img4.jpg"]
    assert list(wrong.index) == [2, 6, 4]
    assert not wrong["correct"].any()
    assert list(most_wrong(predictions, k=1)["path"]) == ["img2.jpg"]


def test_evaluate_writes_metrics_report_and_model_card(tmp_path):
    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work")

    result = evaluate(cfg, *fx.handed_over(cfg))

    assert result["n_test"] == 12 and result["n_wrong"] == 4
    assert result["accuracy"] == pytest.approx(8 / 12)
    assert result["worst_class"] == "cherry"
    assert result["report_uri"] == cfg.artifact(artifacts.REPORT, "index.html")
    metrics = storage.read_json(result["metrics_uri"])
    assert set(metrics) == METRICS_KEYS
    assert metrics["top_k_accuracy"]["k"] == 2
    assert metrics["manifest_hash"] == fx.MANIFEST_HASH
    assert metrics["confusion_matrix"] == [[4, 0, 0], [0, 4, 0], [4, 0, 0]]
    assert metrics["most_confused_pairs"] == [{"true": "cherry", "predicted": "apple", "count": 4, "share": 1.0}]
    gap = metrics["validation_vs_test"]  # the fixture's val split holds the test images: no gap
    assert (gap["validation"]["n"], gap["test"]["n"], gap["differ"]) == (12, 12, False)
    assert gap["validation"]["accuracy"] == pytest.approx(8 / 12)

    report_dir = storage.local_path(cfg.artifact(artifacts.REPORT))
    assert {path.name for path in report_dir.iterdir()} == REPORT_FILES
    predictions = pd.read_csv(report_dir / "predictions.csv")
    assert len(predictions) == 12
    assert list(predictions.columns) == ["path", "true", "predicted", "predicted_probability", "true_probability",
                                         "correct"]
    wrong = pd.read_csv(report_dir / "most_wrong.csv")
    assert len(wrong) == 4 and not wrong["correct"].any()
    assert wrong["predicted_probability"].is_monotonic_decreasing
    assert fx.fine_tune_marker_pixels(report_dir / "curves.png") > 200

    page = (report_dir / "index.html").read_text()
    assert page.count("<figure>") == cfg.top_k_wrong
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r"src='([^']*)'", page))
    assert _links(page) <= {"predictions.csv", "most_wrong.csv", "../metrics.json", "../model_card.md"}
    assert "tlp-evaluate-" not in page and str(tmp_path / "work") not in page
    for text in (cfg.run_id, "efficientnet_lite0", "66.7 %", fx.MANIFEST_HASH, fx.DECISION_REASON):
        assert html.escape(text) in page

    assert "Validation vs test" in page and "agree within their noise" in page

    card = storage.read_text(result["model_card_uri"])
    assert fx.DECISION_REASON in card and fx.MANIFEST_HASH in card
    assert "## Validation vs test" in card and "agree within their noise" in card


def test_evaluate_hands_over_every_test_images_path_and_probabilities(tmp_path):
    from tasks.predict import predict_records

    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work")

    result = evaluate(cfg, *fx.handed_over(cfg))

    assert result["predictions_uri"] == cfg.artifact(artifacts.EVALUATED_PREDICTIONS)
    with np.load(io.BytesIO(storage.read_bytes(result["predictions_uri"])), allow_pickle=False) as stored:
        paths, probabilities = list(stored["paths"]), stored["probabilities"]
    expected, labels, expected_paths = predict_records(fx.colour_model(), tmp_path / "work" / "test.tfrecord")
    assert paths == expected_paths and len(paths) == result["n_test"]
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert np.mean(probabilities.argmax(axis=1) == labels) == result["accuracy"]


def test_evaluate_rerun_rewrites_identical_outputs(tmp_path):
    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work")
    first = evaluate(cfg, *fx.handed_over(cfg))
    metrics, page = storage.read_bytes(first["metrics_uri"]), storage.read_bytes(first["report_uri"])

    second = evaluate(cfg, *fx.handed_over(cfg))

    assert second == first
    assert storage.read_bytes(second["metrics_uri"]) == metrics
    assert storage.read_bytes(second["report_uri"]) == page


def test_evaluate_with_s3_run_root(s3_bucket, tmp_path):
    cfg = fx.config(s3_bucket + "/runs")
    fx.write_run(cfg, tmp_path / "work")

    result = evaluate(cfg, *fx.handed_over(cfg))

    assert result["report_uri"].startswith(s3_bucket)
    listed = storage.list_files(storage.join(cfg.run_uri, "eval"))
    names = {uri.rsplit("/", 1)[1] for uri in listed}
    assert names == REPORT_FILES | {"metrics.json", "model_card.md", "predictions.npz"}
    assert set(storage.read_json(result["metrics_uri"])) == METRICS_KEYS
    assert storage.read_text(result["report_uri"]).count("<figure>") == cfg.top_k_wrong
    predictions = pd.read_csv(io.BytesIO(storage.read_bytes(cfg.artifact(artifacts.REPORT, "predictions.csv"))))
    assert len(predictions) == 12


def test_evaluate_without_decision_or_fine_tune(tmp_path):
    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work", fine_tuned=False)
    storage.delete(cfg.artifact(artifacts.DECISION))

    result = evaluate(cfg, *fx.handed_over(cfg, fine_tuned=False))

    card = storage.read_text(result["model_card_uri"])
    assert "Plateau decision: not recorded" in card
    assert f"Backbone: {cfg.backbone}" in card
    assert "Plateau decision: not recorded" in storage.read_text(result["report_uri"])
    assert fx.fine_tune_marker_pixels(storage.local_path(cfg.artifact(artifacts.REPORT, "curves.png"))) == 0


@pytest.mark.parametrize("artifact", [artifacts.FINE_TUNED_MODEL, artifacts.split_records("test"),
                                      artifacts.split_records("val"), artifacts.MANIFEST])
def test_missing_input_error_names_its_uri(tmp_path, artifact):
    """The kept (fine-tuned) model arrives on fine_tune's edge; the others are found under the run root."""
    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work")
    storage.delete(cfg.artifact(artifact))

    with pytest.raises(MissingInputError, match=re.escape(cfg.artifact(artifact)) + ".*run "):
        evaluate(cfg, *fx.handed_over(cfg))


def _links(page: str) -> set[str]:
    """Every href that is not an in-page anchor."""
    return {href for href in re.findall(r"href='([^']*)'", page) if not href.startswith("#")}
