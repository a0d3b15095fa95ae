"""The model card: what a model is, what it was trained on, how it scored, where not to use it.

Published next to every model version so that someone who finds the model
later can judge it without the pipeline: the backbone and its weights, the
exact data selection (manifest hash), the training phases and why fine-tuning
did or did not run, the test metrics, and the limits those imply.

Class names, file paths and sources come from the dataset and the trigger
form, not from us: they are written as text (`markdown_text`) or code spans
(`markdown_code`), so a class called "[x](javascript:...)" or "<script>" stays a
name, and source URIs lose their credentials (tasks.redact).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tasks import accuracy_gap, data_changes
from tasks.config import RunConfig
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE, LABELS, PhaseSummary
from tasks.records import SPLITS
from tasks.redact import redact_text, redact_uri

WORST_CLASSES = 3
CONFUSED_PAIRS = 5
# what makes Markdown or HTML out of text: escapes, code, emphasis, links/images, tags, entities, tables;
# "_" only where it can start or end emphasis (not inside a word, as in "val_accuracy")
MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]<>&|~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


@dataclass(frozen=True)
class RunRecord:
    """What the earlier steps of a run recorded; optional parts are None when a step did not write them."""

    manifest: dict
    history: dict | None = None  # both phases' epochs as one curve (tasks.phases.curves)
    decision: dict | None = None
    phases: dict[str, PhaseSummary] = field(default_factory=dict)  # the phases that ran
    kept: str | None = None  # the phase whose model the run kept (and evaluated)
    leaderboard: dict | None = None
    changes: dict | None = None  # tasks.data_changes report (check_changes)

    @property
    def backbone(self) -> str:
        first = self.phases.get(FEATURE_EXTRACTION)
        return first.backbone if first else ""

    @property
    def weights_source(self) -> str:
        first = self.phases.get(FEATURE_EXTRACTION)
        return first.weights_source if first else ""

    def val_accuracy(self, phase: str) -> float | None:
        """The phase's best validation accuracy; None when it did not run."""
        summary = self.phases.get(phase)
        return None if summary is None else summary.best_val_accuracy

    def decision_text(self) -> str:
        """One sentence: did fine-tuning run, and why."""
        if self.decision is None:
            return "not recorded (no decision.json in the run root)"
        verdict = "fine-tune" if self.decision.get("fine_tune") else "no fine-tuning"
        return f"{verdict}: {self.decision.get('reason') or 'no reason recorded'}"

    def transfer_text(self) -> str:
        """What transfer learning did on this run, in words a user can act on: which phase was kept, what
        fine-tuning added (validation accuracy before -> after, on how many images) and on which data."""
        before, after = self.val_accuracy(FEATURE_EXTRACTION), self.val_accuracy(FINE_TUNE)
        n_val = sum(self.manifest.get("counts", {}).get("val", {}).values())
        on = f"on {n_val} validation images of {redact_uri(str(self.manifest.get('source', 'the source')))}"
        if before is None:
            return "not recorded (no train summary in the run root)"
        if after is None:
            return (f"the frozen backbone with a new head (feature extraction) reached {percent(before)} validation "
                    f"accuracy {on}; fine-tuning did not run, so that model is the one kept")
        gain = (after - before) * 100
        kept = self.kept == FINE_TUNE
        return (f"fine-tuning the top of the backbone {'added' if gain >= 0 else 'changed'} {gain:+.1f} points of "
                f"validation accuracy ({percent(before)} after feature extraction -> {percent(after)}) {on}; "
                + ("the fine-tuned model is kept" if kept else
                   "it did not beat feature extraction, so the feature-extraction model is kept"))

    def fine_tune_text(self) -> str:
        """What fine-tuning trained: the cut, how many layers, whether the depthwise kernels and why ('' when it did
        not run, or its summary predates these settings)."""
        summary = self.phases.get(FINE_TUNE)
        settings = summary.settings if summary else {}
        if "cut" not in settings:
            return ""
        depthwise = settings.get("depthwise")
        why = f" ({settings['depthwise_reason']})" if settings.get("depthwise_reason") else ""
        return (f"the backbone above {settings['cut']} and the head, on {settings.get('on', 'images')}; "
                f"{len(settings.get('fine_tune_layers', []))} layers trained"
                + (f", depthwise kernels {depthwise}{why}" if depthwise else ""))

    def candidates_text(self) -> str:
        """Which candidate backbones were compared and why the winner won ('' when only one was tried)."""
        board = self.leaderboard or {}
        rows = board.get("candidates", [])
        if len(rows) < 2:
            return ""
        return f"{len(rows)} candidates compared on validation accuracy: {redact_text(board['reason'])}"


def render(cfg: RunConfig, metrics: dict, record: RunRecord) -> str:
    """The model card as Markdown."""
    sections = [
        f"# Model card: {cfg.model_name}",
        f"Run {markdown_code(cfg.run_id)}. Generated by the evaluate step from the run's own records; "
        "the numbers below are on the held-out test split, which was never used to select the model.",
        _model_section(cfg, metrics, record),
        _data_section(cfg, record),
        _training_section(record),
        _evaluation_section(metrics),
        accuracy_gap.card_section(metrics.get("validation_vs_test"),
                                  redact_uri(record.manifest.get("source", cfg.source))),
        _use_section(cfg, metrics, record),
        input_images_section(cfg.image_size),
    ]
    if record.changes is not None:
        sections.insert(4, data_changes.markdown(record.changes))
    return "\n\n".join(section for section in sections if section) + "\n"


def input_images_section(image_size: int) -> str:
    """How the model sees an image, and what a client of the encoded-bytes signature must do first."""
    from tasks import images
    from tasks.serving_export import BYTES_INPUT, BYTES_SIGNATURE, PIXELS_SIGNATURE

    background = "white" if images.BACKGROUND == (255, 255, 255) else f"RGB {images.BACKGROUND}"
    return "\n".join([
        "## Input images",
        f"- Decoder {markdown_code(images.DECODER_VERSION)} (tasks/images.py), the same in training, evaluation and "
        "serving: JPEG, PNG, GIF, BMP or WebP; EXIF orientation applied; transparency composited onto "
        f"{background} {tuple(images.BACKGROUND)}; grayscale, palette, CMYK and 16-bit images made 8-bit RGB "
        "(16 bits keep their high byte); the first frame of an animation; an image whose shorter side is at least "
        f"{2 * images.REDUCED_SIDE} px reduced by box means to no less than {images.REDUCED_SIDE} px; then resized to "
        f"{image_size}x{image_size} (bilinear, antialiased, aspect ratio not kept).",
        f"- SavedModel signature {markdown_code(BYTES_SIGNATURE)}: input {markdown_code(BYTES_INPUT)} (a batch of "
        "encoded image files, tf.string) → `probabilities` and `labels` (the top class's name). It decodes in the "
        "graph all of the above except what TensorFlow cannot do, which the client does first: **apply the EXIF "
        "orientation**, and send as PNG (the first frame, composited onto the background) any **GIF with a "
        "transparent colour** or a first frame smaller than its screen, any **animated WebP without alpha** and "
        "any **BMP not of uncompressed 24- or 32-bit pixels** (palette, 16-bit, compressed); everything else is sent "
        "as the file is. "
        "`tasks.images.client_bytes(data)` is exactly that preprocessing.",
        f"- SavedModel signature {markdown_code(PIXELS_SIGNATURE)} and the TFLite files: float32 RGB "
        f"[batch, {image_size}, {image_size}, 3] in [0, 255], decoded and resized as above "
        "(`tasks.images.decode(data, image_size)`).",
    ])


def _model_section(cfg: RunConfig, metrics: dict, record: RunRecord) -> str:
    first = record.phases.get(FEATURE_EXTRACTION)
    lines = [
        "## Model",
        f"- Backbone: {markdown_text(redact_text(record.backbone or cfg.backbone))} "
        f"(weights: {markdown_text(redact_text(record.weights_source or cfg.backbone_weights))})",
        f"- Head: global pooling -> dropout {cfg.dropout} -> dense softmax over {len(metrics['classes'])} classes"
        + (f" on {first.feature_dim}-d features" if first else ""),
        f"- Input: {cfg.image_size}x{cfg.image_size} RGB, raw pixel values in [0, 255] "
        "(the model applies the backbone's own preprocessing)"
        + (f"; {markdown_text((record.leaderboard or {})['image_size_auto'])}"
           if "image_size_auto" in (record.leaderboard or {}) else ""),
        f"- Kept model: {LABELS.get(record.kept, 'not recorded')}"
        + (f" (validation accuracy: feature extraction {percent(record.val_accuracy(FEATURE_EXTRACTION))}, "
           f"fine-tuned {percent(record.val_accuracy(FINE_TUNE))})" if first else ""),
    ]
    return "\n".join(lines)


def _data_section(cfg: RunConfig, record: RunRecord) -> str:
    manifest = record.manifest
    counts = manifest.get("counts", {})
    splits = ordered_splits(counts)
    classes = list(manifest["classes"])
    selection = (f"{cfg.train_count} train images per class" if cfg.train_count
                 else f"{cfg.train_percent:g} % of the source's train images per class")
    rows = [[markdown_text(name), *(str(counts[split].get(name, 0)) for split in splits)] for name in classes]
    rows.append(["**total**", *(f"**{sum(counts[split].values())}**" for split in splits)])
    lines = [
        "## Data",
        f"- Source: {_source(cfg.source, record)}",
        f"- Classes ({len(classes)}): {', '.join(markdown_text(name) for name in classes)}",
        f"- Selection: {selection}, {cfg.val_fraction:g} of it held out for validation, "
        f"{cfg.test_percent:g} % of the test split; seed {manifest.get('seed', cfg.seed)}",
        f"- Manifest hash: {markdown_code(manifest['hash'])} (identifies the exact selection of files and labels)",
        f"- Unreadable images skipped: {len(manifest.get('skipped', []))}; files with names that are not UTF-8 "
        f"left out: {len(manifest.get('skipped_names', []))}; test images identical to a training or validation "
        f"image removed: {len(manifest.get('test_duplicates', []))}",
        "",
        _table(["class", *splits], rows),
    ]
    return "\n".join(lines)


def _training_section(record: RunRecord) -> str:
    rows = [[LABELS[phase], str(summary.epochs), _seconds(summary.seconds), percent(summary.best_val_accuracy)]
            for phase, summary in record.phases.items()]
    lines = ["## Training"]
    if rows:
        lines += [_table(["phase", "epochs", "time", "best validation accuracy"], rows), ""]
    else:
        lines += ["- Phases: not recorded (no train summary in the run root)"]
    lines.append(f"- Plateau decision: {record.decision_text()}")
    lines.append(f"- Transfer: {markdown_text(record.transfer_text())}")
    if record.fine_tune_text():
        lines.append(f"- Fine-tuned: {markdown_text(record.fine_tune_text())}")
    if record.candidates_text():
        board = record.leaderboard
        rows = [[str(row.get("rank", "")), markdown_code(redact_text(row["spec"])), percent(row["val_accuracy"]),
                 _seconds(row["seconds"]), markdown_text(redact_text(row["error"] or ""))]
                for row in board["candidates"]]
        lines += [f"- Candidates: {markdown_text(record.candidates_text())}", "",
                  _table(["rank", "backbone@size", "best validation accuracy", "time", "error"], rows)]
    return "\n".join(lines)


def _evaluation_section(metrics: dict) -> str:
    n = metrics["n_test"]
    accuracy = metrics["accuracy"]
    top_k = metrics["top_k_accuracy"]
    per_class = metrics["per_class"]
    rows = [[markdown_text(name), *(f"{per_class[name][key]:.3f}" for key in ("precision", "recall", "f1")),
             str(per_class[name]["support"])] for name in worst_classes(metrics, WORST_CLASSES)]
    pairs = [f"- {markdown_text(pair['true'])} -> {markdown_text(pair['predicted'])}: {pair['count']} "
             f"({percent(pair['share'])} of {markdown_text(pair['true'])})"
             for pair in metrics["most_confused_pairs"][:CONFUSED_PAIRS]]
    lines = [
        f"## Evaluation ({n} test images)",
        f"- Accuracy: {percent(accuracy)} (+/- {percent(1.96 * math.sqrt(accuracy * (1 - accuracy) / n))} "
        "at 95 % confidence, normal approximation)",
        f"- Top-{top_k['k']} accuracy: {percent(top_k['value'])}",
        f"- Macro F1: {metrics['macro_avg']['f1']:.3f}; weighted F1: {metrics['weighted_avg']['f1']:.3f}",
        f"- Loss (sparse categorical cross-entropy): {metrics['loss']:.4f}",
        "",
        "Worst classes by F1:",
        "",
        _table(["class", "precision", "recall", "F1", "support"], rows),
        "",
        "Most confused (true -> predicted):" if pairs else "No test image was misclassified.",
        "",
        *pairs,
    ]
    return "\n".join(lines)


def _use_section(cfg: RunConfig, metrics: dict, record: RunRecord) -> str:
    classes = metrics["classes"]
    train_images = sum(record.manifest.get("counts", {}).get("train", {}).values())
    macro_f1 = metrics["macro_avg"]["f1"]
    weak = [markdown_text(name) for name in worst_classes(metrics, WORST_CLASSES)
            if metrics["per_class"][name]["f1"] < macro_f1]
    return "\n".join([
        "## Intended use",
        f"- Sorting images that look like those of {_source(cfg.source, record)} into "
        f"the {len(classes)} classes above; a transfer-learning baseline to compare later models against.",
        "",
        "## Limitations",
        f"- Closed set: any image is forced into one of the {len(classes)} classes, often with high confidence; "
        "there is no 'none of these' answer.",
        f"- Trained on {train_images} images; measured on {metrics['n_test']} test images, so small classes have "
        "wide error bars. Check the per-class metrics before relying on a class"
        + (f"; below the average here: {', '.join(weak)}." if weak else "."),
        f"- Images are resized to {cfg.image_size}x{cfg.image_size}; accuracy on images from other cameras, "
        "sources or conditions than the training data is unknown"
        + (" beyond the test source measured above." if record.manifest.get("test_source") else "."),
        "- Not evaluated for fairness, robustness to adversarial inputs, or any safety-critical use.",
    ])


def release_section(metrics: dict) -> str:
    """What publish checked before release: the serving check and each TFLite variant (accuracy, size, latency).

    Mobile users take a kept variant from the version's `tflite/` folder.
    """
    serving, tflite = metrics["serving_check"], metrics["tflite"]
    lines = ["## Release checks",
             f"- Serving check (fresh process, {serving['n_images']} golden test images): largest difference "
             + ", ".join(f"{name} {diff:.1e}" for name, diff in serving["max_abs_diff"].items())
             + f" (tolerance {serving['tolerance']:g})",
             f"- TFLite: {markdown_text(tflite['status'])}"]
    variants = tflite.get("variants", {})
    if variants:
        rows = [[name, percent(entry.get("accuracy")),
                 "" if entry.get("size_bytes") is None else f"{entry['size_bytes'] / 1e6:.2f} MB",
                 "" if entry.get("latency_ms") is None else f"{entry['latency_ms']:.2f} ms",
                 f"tflite/{name}.tflite" if entry.get("kept") else markdown_text(entry.get("reason", "not kept"))]
                for name, entry in variants.items()]
        lines += ["", f"Keras test accuracy {percent(metrics['accuracy'])}; each variant scored on the same test split "
                  "with the LiteRT interpreter:", "",
                  _table(["variant", "test accuracy", "size", "latency per image", "file"], rows)]
    return "\n".join(lines)


def ordered_splits(counts: dict) -> list[str]:
    """The splits of manifest counts in pipeline order (train, val, test), then any others."""
    return [split for split in SPLITS if split in counts] + sorted(set(counts) - set(SPLITS))


def worst_classes(metrics: dict, n: int) -> list[str]:
    """The n classes with the lowest F1 (then lowest recall, then name)."""
    per_class = metrics["per_class"]
    return sorted(per_class, key=lambda name: (per_class[name]["f1"], per_class[name]["recall"], name))[:n]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of cells that are Markdown already (data in them went through markdown_text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_text(text: str) -> str:
    """Text shown as typed in Markdown: one line, every character that would make markup backslash-escaped."""
    return MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), " ".join(str(text).splitlines()))


def markdown_code(text: str) -> str:
    """Text as an inline code span, fenced by more backticks than it contains (nothing inside is markup)."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _source(source: str, record: RunRecord) -> str:
    return markdown_code(redact_uri(record.manifest.get("source", source)))


def percent(value: float | None) -> str:
    """0.9312 -> "93.1 %"; None -> "n/a"."""
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"
