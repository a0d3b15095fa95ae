"""The evaluation report: one self-contained HTML page plus its PNGs and CSVs.

The page must open from a laptop's disk, an S3 download or the Airflow UI with
no server and no network, so every image is embedded as a data: URI, every
link is relative, and all text is HTML-escaped: the page is rendered from
templates/report.html.j2 with autoescaping (class names and file paths come
from the dataset, not from us).
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from tasks import artifacts, images, model_card
from tasks.config import RunConfig
from tasks.csv_cells import write_csv
from tasks.model_card import RunRecord, percent
from tasks.phases import LABELS
from tasks.records import iter_records
from tasks.redact import redact_text, redact_uri

CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
PREDICTIONS = "predictions.csv"
MOST_WRONG = "most_wrong.csv"
TEMPLATE = "report.html.j2"
RELEASE_TEMPLATE = "release.html.j2"
RELEASE = "release.html"
MODEL_CARD_LINK = "../model_card.md"
METRICS_LINK = "../metrics.json"

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
FINE_TUNE_COLOR = "#d62728"
THUMBNAIL_PX = 128
ANNOTATED_CLASSES = 25  # above this the confusion matrix cells get too small for numbers
CONFUSED_PAIRS = 10


def write_report(directory: Path, cfg: RunConfig, metrics: dict, record: RunRecord, *, predictions: pd.DataFrame,
                 wrong: pd.DataFrame, pairs: list[dict], test_records: Path, model_card: str) -> Path:
    """Write the page (artifacts.REPORT_PAGE), the two plots and the two CSVs into `directory`; returns it.

    `wrong` is every wrong prediction, surest first; the gallery shows the first
    cfg.top_k_wrong of them with thumbnails from the test records.
    """
    directory.mkdir(parents=True, exist_ok=True)
    plot_curves(record.history, directory / CURVES)
    plot_confusion(np.asarray(metrics["confusion_matrix"]), metrics["classes"], directory / CONFUSION)
    write_csv(predictions, directory / PREDICTIONS)
    write_csv(wrong, directory / MOST_WRONG)
    gallery = wrong.head(cfg.top_k_wrong)
    thumbnails = {index: thumbnail_data_uri(encoded) for index, encoded in _encoded_images(test_records, gallery.index)}
    page = _page(cfg, metrics, record, directory, wrong, gallery, thumbnails, pairs, model_card)
    (directory / artifacts.REPORT_PAGE).write_text(page, encoding="utf-8")
    return directory


def write_release_page(directory: Path, model_name: str, release_markdown: str) -> Path:
    """release.html beside the report: the release checks publish ran (Markdown rendered, raw HTML escaped)."""
    page = _environment().get_template(RELEASE_TEMPLATE).render(model_name=model_name,
                                                                body=markdown_html(release_markdown))
    (directory / RELEASE).write_text(page, encoding="utf-8")
    return directory / RELEASE


def plot_curves(history: dict | None, path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, across both phases; fine-tune start marked."""
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    epochs = (history or {}).get("epochs", [])
    start = (history or {}).get("fine_tune_start_epoch")
    x = [epoch["epoch"] for epoch in epochs]
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        axes.plot(x, _series(epochs, metric), "o-", color=TRAIN_COLOR, label="train")
        axes.plot(x, _series(epochs, f"val_{metric}"), "o-", color=VAL_COLOR, label="validation")
        if start is not None:
            axes.axvline(start - 0.5, color=FINE_TUNE_COLOR, linestyle="--", linewidth=2,
                         label=f"fine-tuning starts (epoch {start})")
        if not epochs:
            axes.text(0.5, 0.5, "no training history recorded", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(metric)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def _series(epochs: list[dict], key: str) -> list[float]:
    return [float("nan") if epoch.get(key) is None else epoch[key] for epoch in epochs]


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    """Rows are true classes, columns predicted; colour is the share of the true class, text the count."""
    n = len(classes)
    side = min(max(5.0, 2.5 + 0.4 * n), 40.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    # class names are data: drawn as typed, never parsed as $mathtext$
    axes.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor", parse_math=False)
    axes.set_yticks(range(n), labels=classes, parse_math=False)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if n <= ANNOTATED_CLASSES:
        for (row, column), count in np.ndenumerate(confusion):
            axes.text(column, row, str(count), ha="center", va="center", fontsize=9 if n <= 12 else 7,
                      color="white" if share[row, column] > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    figure.savefig(path)


def thumbnail_data_uri(encoded: bytes, size: int = THUMBNAIL_PX) -> str:
    """A PNG data: URI of an encoded image as the model sees it (tasks.images), shrunk to fit size x size."""
    thumbnail = Image.fromarray(images.to_rgb(encoded))
    thumbnail.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG", optimize=True)
    return _data_uri(buffer.getvalue())


def _encoded_images(records_path: Path, indices: pd.Index):
    """(position, encoded bytes) of the records at these positions, reading no further than needed."""
    wanted = set(int(index) for index in indices)
    for position, (encoded, _, _) in enumerate(iter_records(records_path)):
        if not wanted:
            return
        if position in wanted:
            wanted.discard(position)
            yield position, encoded


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _page(cfg: RunConfig, metrics: dict, record: RunRecord, directory: Path, wrong: pd.DataFrame,
          gallery: pd.DataFrame, thumbnails: dict[int, str], pairs: list[dict], card: str) -> str:
    """The page's values, rendered by the template; every value is escaped there."""
    top_k = metrics["top_k_accuracy"]
    manifest = record.manifest
    counts = manifest.get("counts", {})
    splits = model_card.ordered_splits(counts)
    class_rows, class_row_classes = _class_rows(metrics, pairs)
    gap = metrics.get("validation_vs_test")
    return _environment().get_template(TEMPLATE).render(
        model_name=cfg.model_name,
        run_id=cfg.run_id,
        backbone=redact_text(record.backbone or cfg.backbone),
        weights=redact_text(record.weights_source or cfg.backbone_weights),
        kept=LABELS.get(record.kept, "not recorded"),
        cards=[
            (percent(metrics["accuracy"]), "test accuracy"),
            *([(percent(gap["validation"]["accuracy"]), "validation accuracy")] if gap else []),
            (percent(top_k["value"]), f"top-{top_k['k']} accuracy"),
            (f"{metrics['macro_avg']['f1']:.3f}", "macro F1"),
            (f"{metrics['loss']:.4f}", "test loss"),
            (str(metrics["n_test"]), "test images"),
            (str(len(wrong)), "wrong"),
        ],
        gap=gap,
        gap_rows=[[name, entry.get("source") or redact_uri(str(manifest.get("source", ""))), entry["n"],
                   percent(entry["accuracy"]), f"{percent(entry['interval'][0])} to {percent(entry['interval'][1])}"]
                  for name, entry in (("validation", gap["validation"]), ("test", gap["test"]))] if gap else [],
        decision=record.decision_text(),
        transfer=record.transfer_text(),
        candidates=record.candidates_text(),
        candidate_rows=[[row.get("rank", ""), redact_text(row["spec"]), percent(row["val_accuracy"]),
                         gap_text(row["val_accuracy"], _winner_accuracy(record), _n_val(manifest)),
                         "" if row["seconds"] is None else f"{row['seconds']:.0f}", redact_text(row["error"] or "")]
                        for row in (record.leaderboard or {}).get("candidates", [])],
        leaderboard_noise=(f"Validation accuracy is measured on {_n_val(manifest)} images: a gap within its ± noise "
                           "(95 %, as if the two scores were independent) may be chance, and another sample of "
                           "images could rank these candidates differently."),
        curves=_data_uri((directory / CURVES).read_bytes()),
        confusion=_data_uri((directory / CONFUSION).read_bytes()),
        pairs=[[p["true"], p["predicted"], p["count"], percent(p["share"])] for p in pairs[:CONFUSED_PAIRS]],
        class_rows=class_rows,
        class_row_classes=class_row_classes,
        gallery=[{"src": thumbnails[index], "path": row["path"], "true": row["true"], "predicted": row["predicted"],
                  "confidence": percent(row["predicted_probability"]), "p_true": percent(row["true_probability"])}
                 for index, row in gallery.iterrows()],
        n_wrong=len(wrong),
        source=redact_uri(str(manifest.get("source", ""))),
        seed=manifest.get("seed"),
        manifest_hash=manifest["hash"],
        n_skipped=len(manifest.get("skipped", [])),
        data_headers=["class", *splits],
        data_rows=[[name, *(counts[split].get(name, 0) for split in splits)] for name in manifest["classes"]]
        + [["total", *(sum(counts[split].values()) for split in splits)]],
        data_numeric=tuple(range(1, len(splits) + 1)),
        params=[[name, _param_text(value) + (
                    f" ({(record.leaderboard or {}).get('image_size_auto', 'image_size auto')})"
                    if name == "image_size" and name in cfg.asked and cfg.asked[name] is None else
                    f" (asked: {_param_text(cfg.asked[name])}; resolved from the winning candidate)"
                    if name in cfg.asked and cfg.asked[name] != value else "")]
                for name, value in cfg.to_dict().items()],
        params_resolved=any(cfg.asked.get(name, value) != value for name, value in cfg.to_dict().items()),
        predictions_csv=PREDICTIONS,
        most_wrong_csv=MOST_WRONG,
        metrics_link=METRICS_LINK,
        model_card_link=MODEL_CARD_LINK,
        model_card=markdown_html(card),
    )


def markdown_html(text: str) -> Markup:
    """Markdown (headings, lists, tables, code) as HTML; raw HTML in the text is escaped, never rendered."""
    from markdown_it import MarkdownIt

    return Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


def gap_text(accuracy: float | None, winner: float | None, n: int) -> str:
    """A candidate's validation-accuracy gap to the winner with its 95 % sampling noise on n images."""
    if accuracy is None or winner is None or not n:
        return ""
    noise = 1.96 * math.sqrt((accuracy * (1 - accuracy) + winner * (1 - winner)) / n)
    return f"{accuracy - winner:+.3f} ± {noise:.3f}"


def _winner_accuracy(record: RunRecord) -> float | None:
    ranked = [row for row in (record.leaderboard or {}).get("candidates", []) if row.get("val_accuracy") is not None]
    return max((row["val_accuracy"] for row in ranked), default=None)


def _n_val(manifest: dict) -> int:
    return sum((manifest.get("counts") or {}).get("val", {}).values())


def _param_text(value) -> str:
    return redact_text(value if isinstance(value, str) else json.dumps(value))


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The report templates, autoescaped: every value from the dataset or a param is text, never markup."""
    return jinja2.Environment(loader=jinja2.PackageLoader("tasks", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def _class_rows(metrics: dict, pairs: list[dict]) -> tuple[list[list], list[str]]:
    """Per-class table rows (then the two averages) and each row's CSS class ("weak" below the macro F1)."""
    mistaken_for: dict[str, dict] = {}
    for pair in pairs:
        mistaken_for.setdefault(pair["true"], pair)
    macro_f1 = metrics["macro_avg"]["f1"]
    rows, classes = [], []
    for name, scores in metrics["per_class"].items():
        pair = mistaken_for.get(name)
        rows.append([name, *(f"{scores[key]:.3f}" for key in ("precision", "recall", "f1")), scores["support"],
                     f"{pair['predicted']} ({pair['count']})" if pair else "-"])
        classes.append("weak" if scores["f1"] < macro_f1 else "")
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        average = metrics[key]
        rows.append([label, *(f"{average[k]:.3f}" for k in ("precision", "recall", "f1")), average["support"], ""])
        classes.append("")
    return rows, classes
