"""The evaluation report: one self-contained HTML page plus its PNGs and CSVs.

The page must open from a laptop's disk, an S3 download or the Airflow UI with
no server and no network, so every image is embedded as a data: URI, every
link is relative, and all text is HTML-escaped (class names and file paths come
from the dataset, not from us).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from tasks import model_card
from tasks.config import RunConfig
from tasks.model_card import RunRecord, percent
from tasks.records import iter_records

INDEX = "index.html"
CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
PREDICTIONS = "predictions.csv"
MOST_WRONG = "most_wrong.csv"
MODEL_CARD_LINK = "../model_card.md"
METRICS_LINK = "../metrics.json"

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
FINE_TUNE_COLOR = "#d62728"
THUMBNAIL_PX = 128
ANNOTATED_CLASSES = 25  # above this the confusion matrix cells get too small for numbers
CONFUSED_PAIRS = 10

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1100px;margin:0 auto;
padding:24px}
h1{margin:0 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0}nav a{margin-right:14px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#666;font-size:13px}
table{border-collapse:collapse;margin:8px 0}th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}
th{background:#f6f6f6}.num{text-align:right;font-variant-numeric:tabular-nums}tr.weak td{background:#fdecea}
img.plot{max-width:100%;border:1px solid #eee}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
.gallery figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.gallery img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;display:block;margin:0 auto 6px}
.true{color:#1a7f37}.pred{color:#c62828}.path{color:#888;word-break:break-all;font-size:11px}
code,pre{background:#f6f6f6;border-radius:4px}pre{padding:12px;overflow-x:auto;white-space:pre-wrap}
"""


def write_report(directory: Path, cfg: RunConfig, metrics: dict, record: RunRecord, *, predictions: pd.DataFrame,
                 wrong: pd.DataFrame, pairs: list[dict], test_records: Path, model_card: str) -> Path:
    """Write index.html, the two plots and the two CSVs into `directory`; returns it.

    `wrong` is every wrong prediction, surest first; the gallery shows the first
    cfg.top_k_wrong of them with thumbnails from the test records.
    """
    directory.mkdir(parents=True, exist_ok=True)
    plot_curves(record.history, directory / CURVES)
    plot_confusion(np.asarray(metrics["confusion_matrix"]), metrics["classes"], directory / CONFUSION)
    predictions.to_csv(directory / PREDICTIONS, index=False, float_format="%.6f")
    wrong.to_csv(directory / MOST_WRONG, index=False, float_format="%.6f")
    gallery = wrong.head(cfg.top_k_wrong)
    thumbnails = {index: thumbnail_data_uri(encoded) for index, encoded in _encoded_images(test_records, gallery.index)}
    page = _page(cfg, metrics, record, directory, wrong, gallery, thumbnails, pairs, model_card)
    (directory / INDEX).write_text(page, encoding="utf-8")
    return directory


def plot_curves(history: dict | None, path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, across both phases; fine-tune start marked."""
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    epochs = (history or {}).get("epochs", [])
    start = (history or {}).get("fine_tune_start_epoch")
    x = [epoch["epoch"] for epoch in epochs]
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
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
    axes.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n), labels=classes)
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
    """A PNG data: URI of an encoded image, shrunk to fit size x size (small images are kept as they are)."""
    with Image.open(io.BytesIO(encoded)) as image:
        thumbnail = image.convert("RGB")
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
    e = html.escape
    backbone = record.backbone or cfg.backbone
    top_k = metrics["top_k_accuracy"]
    cards = [
        (percent(metrics["accuracy"]), "test accuracy"),
        (percent(top_k["value"]), f"top-{top_k['k']} accuracy"),
        (f"{metrics['macro_avg']['f1']:.3f}", "macro F1"),
        (f"{metrics['loss']:.4f}", "test loss"),
        (str(metrics["n_test"]), "test images"),
        (str(len(wrong)), "wrong"),
    ]
    sections = [
        f"<h1>{e(cfg.model_name)}</h1>",
        f"<p class='sub'>run <code>{e(cfg.run_id)}</code> &middot; backbone <b>{e(backbone)}</b>"
        f" ({e(record.weights_source or cfg.backbone_weights)}) &middot; kept model: "
        f"{e((record.summary or {}).get('kept', 'not recorded'))}</p>",
        "<nav><a href='#training'>Training</a><a href='#confusion'>Confusion</a><a href='#classes'>Classes</a>"
        "<a href='#gallery'>Most wrong</a><a href='#data'>Data</a><a href='#params'>Params</a>"
        "<a href='#files'>Files &amp; model card</a></nav>",
        "<div class='cards'>" + "".join(f"<div class='card'><b>{e(value)}</b><span>{e(label)}</span></div>"
                                        for value, label in cards) + "</div>",
        "<h2 id='training'>Training</h2>",
        f"<p>Plateau decision: {e(record.decision_text())}</p>",
        _img(directory / CURVES, "loss and accuracy per epoch"),
        "<h2 id='confusion'>Confusion matrix</h2>",
        _img(directory / CONFUSION, "confusion matrix, rows true, columns predicted"),
        "<h3>Most confused pairs</h3>",
        _table(["true", "predicted as", "count", "share of true class"],
               [[p["true"], p["predicted"], p["count"], percent(p["share"])] for p in pairs[:CONFUSED_PAIRS]],
               numeric={2, 3})
        if pairs else "<p>No test image was misclassified.</p>",
        "<h2 id='classes'>Per class</h2>",
        "<p>Shaded: classes whose F1 is below the macro average.</p>",
        _class_table(metrics, pairs),
        "<h2 id='gallery'>Most confidently wrong</h2>",
        f"<p>The {len(gallery)} wrong predictions the model was surest of, out of {len(wrong)} wrong "
        f"(all of them: <a href='{MOST_WRONG}'>{MOST_WRONG}</a>).</p>",
        _gallery(gallery, thumbnails),
        "<h2 id='data'>Data</h2>",
        _data(record.manifest),
        "<h2 id='params'>Params</h2>",
        _table(["param", "value"], [[name, value if isinstance(value, str) else json.dumps(value)]
                                    for name, value in cfg.to_dict().items()]),
        "<h2 id='files'>Files &amp; model card</h2>",
        f"<ul><li><a href='{PREDICTIONS}'>{PREDICTIONS}</a>: every test image</li>"
        f"<li><a href='{MOST_WRONG}'>{MOST_WRONG}</a>: the wrong ones, surest first</li>"
        f"<li><a href='{METRICS_LINK}'>metrics.json</a></li>"
        f"<li><a href='{MODEL_CARD_LINK}'>model_card.md</a></li></ul>",
        f"<details><summary>Model card</summary><pre>{e(card)}</pre></details>",
    ]
    title = e(f"{cfg.model_name}: evaluation of run {cfg.run_id}")
    body = "\n".join(sections)
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _class_table(metrics: dict, pairs: list[dict]) -> str:
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
    return _table(["class", "precision", "recall", "F1", "support", "most often mistaken for"], rows,
                  numeric={1, 2, 3, 4}, row_classes=classes)


def _gallery(gallery: pd.DataFrame, thumbnails: dict[int, str]) -> str:
    e = html.escape
    figures = [
        f"<figure><img src='{thumbnails[index]}' alt='{e(row['path'])}'><figcaption>"
        f"<span class='true'>true: {e(row['true'])}</span><br>"
        f"<span class='pred'>predicted: {e(row['predicted'])}</span><br>"
        f"confidence {percent(row['predicted_probability'])}<br>"
        f"p(true) {percent(row['true_probability'])}<br><span class='path'>{e(row['path'])}</span>"
        "</figcaption></figure>"
        for index, row in gallery.iterrows()
    ]
    return "<div class='gallery'>" + "".join(figures) + "</div>" if figures else "<p>None.</p>"


def _data(manifest: dict) -> str:
    e = html.escape
    counts = manifest.get("counts", {})
    splits = model_card.ordered_splits(counts)
    rows = [[name, *(counts[split].get(name, 0) for split in splits)] for name in manifest["classes"]]
    rows.append(["total", *(sum(counts[split].values()) for split in splits)])
    return (f"<p>Source <code>{e(str(manifest.get('source', '')))}</code> &middot; seed {e(str(manifest.get('seed')))}"
            f" &middot; manifest hash <code>{e(str(manifest['hash']))}</code> &middot; "
            f"unreadable images skipped: {len(manifest.get('skipped', []))}</p>"
            + _table(["class", *splits], rows, numeric=set(range(1, len(splits) + 1))))


def _img(path: Path, alt: str) -> str:
    return f"<img class='plot' src='{_data_uri(path.read_bytes())}' alt='{html.escape(alt)}'>"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(),
           row_classes: list[str] | None = None) -> str:
    """An escaped HTML table; columns in `numeric` are right-aligned."""
    def cell(tag: str, column: int, value) -> str:
        align = " class='num'" if column in numeric else ""
        return f"<{tag}{align}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", column, header) for column, header in enumerate(headers))
    body = []
    for position, row in enumerate(rows):
        css = f" class='{row_classes[position]}'" if row_classes and row_classes[position] else ""
        body.append(f"<tr{css}>" + "".join(cell("td", column, value) for column, value in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
