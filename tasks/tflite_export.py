"""TFLite variants of a model about to be published, each measured with the LiteRT interpreter.

Phones and edge boxes run TFLite, not SavedModels, and quantisation can cost
accuracy silently. So the SavedModel export is converted to float32 and
float16-weight variants; each is scored on the whole
test split with the LiteRT interpreter (`ai-edge-litert`; `tf.lite.Interpreter`
is deprecated), its file size and single-image latency are measured, and it is
kept (published beside the model) only when its accuracy stays within
MAX_ACCURACY_CHANGE of the Keras model's. A model the converter refuses is
reported as not convertible: the Keras model and SavedModel still publish.

Beside the variants, when float32 is kept, `scoring.tflite`: the float32 model of
the SavedModel's `serve_embeddings` signature (probabilities and embeddings from
one pass), which batch scoring runs. Its probabilities must equal the float32
variant's on a batch of test images (SCORING_TOLERANCE), else it is not kept and
batch scoring uses float32.tflite without embeddings. The variants themselves keep
one signature with one output, as phones expect.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tasks.serving_export import EMBEDDINGS_SIGNATURE, PIXELS_INPUT, PIXELS_SIGNATURE

log = logging.getLogger(__name__)

# float32, and float16 weights (half the size, the same accuracy; XNNPACK runs it at float32 speed on CPUs, GPU
# delegates natively). Dynamic-range quantisation (int8 weights, a quarter of the size) was measured on the
# default run: 2.0 ms/image against 1.1 (its hybrid kernels miss XNNPACK on x86) and 20 s to score the test
# split against 7 s for float16, so it is not built.
VARIANTS = ("float32", "float16")
MAX_ACCURACY_CHANGE = 0.005  # 0.5 accuracy points either way
TOLERANCE = 1e-9  # accuracies are ratios of counts: absorb float error at the boundary
ACCURACY_BATCH = 64
LATENCY_IMAGES = 50
LATENCY_WARMUP = 5
LATENCY_THREADS = 1  # one core: comparable across workers, and what a small device gives one model
KEPT_IMAGES = max(ACCURACY_BATCH, LATENCY_IMAGES)  # the first test images, kept for the latency and the scoring model
INTERPRETER = "ai-edge-litert"
SCORING_FILE = "scoring.tflite"
SCORING_TOLERANCE = 1e-5  # the same float32 graph with one more output: equal up to kernel order
MLIR_LOCATION = re.compile(r"<unknown>:0: error: loc\(.*\)\): ")


def export_variants(saved_model: Path, test_records: Path, keras_accuracy: float,
                    out_dir: Path) -> tuple[dict, np.ndarray | None]:
    """Convert, score and keep; kept variants are written to `out_dir/<variant>.tflite`.

    Returns the `tflite` section of metrics.json: the status ("converted" or
    "not convertible: <reason>"), the interpreter, the Keras accuracy and the
    allowed change, and per variant its accuracy, size, latency and whether it was
    kept (with `file`, relative to the version) or why not; and the float32
    variant's probabilities for every test record, in file order (None when it was
    not convertible). The test split is decoded once for every variant.
    """
    section = {"status": "converted", "interpreter": f"{INTERPRETER} {version(INTERPRETER)}",
               "keras_accuracy": keras_accuracy, "max_accuracy_change": MAX_ACCURACY_CHANGE,
               "latency": {"batch": 1, "threads": LATENCY_THREADS, "images": LATENCY_IMAGES,
                           "statistic": "median"}, "variants": {}}
    converted: dict[str, tuple[bytes, float]] = {}
    for variant in VARIANTS:
        started = time.monotonic()
        try:
            converted[variant] = convert(saved_model, variant), time.monotonic() - started
        except Exception as error:  # the converter raises ConverterError, ValueError, RuntimeError, ...
            reason = f"not convertible: {type(error).__name__}: {_first_line(error)}"
            if variant == VARIANTS[0]:
                section["status"] = reason
                log.warning("tflite: %s is %s", saved_model, reason)
                return section, None
            section["variants"][variant] = {"kept": False, "reason": reason}
    scored = score_split({variant: flatbuffer for variant, (flatbuffer, _) in converted.items()}, test_records)
    for variant, (flatbuffer, convert_s) in converted.items():
        section["variants"][variant] = _measure(variant, flatbuffer, scored, keras_accuracy, out_dir, convert_s)
        if variant == "float32" and section["variants"][variant]["kept"]:
            section["scoring"] = _scoring_model(saved_model, scored.first[:ACCURACY_BATCH],
                                                scored.probabilities[variant][:ACCURACY_BATCH], out_dir)
    section["variants"] = {variant: section["variants"][variant] for variant in VARIANTS
                           if variant in section["variants"]}
    return section, scored.probabilities[VARIANTS[0]]


@dataclass
class Scored:
    """Every variant's probabilities for the test split (file order), its labels, and its first images (for the
    latency and the scoring model's check)."""

    probabilities: dict[str, np.ndarray]
    labels: np.ndarray
    first: np.ndarray


def score_split(flatbuffers: dict[str, bytes], test_records: Path) -> Scored:
    """Run every TFLite model over the split, each batch decoded once for all of them, on all cores."""
    from tasks.records import image_dataset

    interpreters = {variant: _interpreter(flatbuffer, os.cpu_count()) for variant, flatbuffer in flatbuffers.items()}
    sizes = {image_size for _, image_size in interpreters.values()}
    if len(sizes) != 1:
        raise ValueError(f"the TFLite variants take different image sizes {sorted(sizes)}")
    probabilities: dict[str, list[np.ndarray]] = {variant: [] for variant in flatbuffers}
    labels, first = [], []
    for images, batch_labels in image_dataset(test_records, sizes.pop(), ACCURACY_BATCH):
        pixels = images.numpy()
        for variant, (interpreter, _) in interpreters.items():
            probabilities[variant].append(_invoke(interpreter, pixels).copy())
        labels.append(batch_labels.numpy())
        if sum(len(batch) for batch in first) < KEPT_IMAGES:
            first.append(pixels)
    return Scored({variant: np.concatenate(rows) for variant, rows in probabilities.items()}, np.concatenate(labels),
                  np.concatenate(first)[:KEPT_IMAGES])


def convert(saved_model: Path, variant: str, signature: str = PIXELS_SIGNATURE) -> bytes:
    """One TFLite flatbuffer of one of the SavedModel's pixel signatures (the serving one by default)."""
    import tensorflow as tf

    from tasks.savedmodel_scan import check_saved_model

    check_saved_model(saved_model, f"SavedModel {saved_model}")
    # the pixels signature only: the encoded-bytes one decodes with ops TFLite does not have
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[signature])
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def latency_ms(flatbuffer: bytes, images: np.ndarray) -> float:
    """Median milliseconds per single-image invocation on one thread, after a few warm-up calls."""
    interpreter, _ = _interpreter(flatbuffer, LATENCY_THREADS)
    singles = [image[None] for image in images[:LATENCY_IMAGES]]
    for image in singles[:LATENCY_WARMUP]:
        _invoke(interpreter, image)
    timings = []
    for image in singles:
        started = time.perf_counter()
        _invoke(interpreter, image)
        timings.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings))


def _measure(variant: str, flatbuffer: bytes, scored: Scored, keras_accuracy: float, out_dir: Path,
             convert_s: float) -> dict:
    n_images = len(scored.labels)
    score = int(np.sum(scored.probabilities[variant].argmax(axis=1) == scored.labels)) / n_images
    change = score - keras_accuracy
    kept = abs(change) <= MAX_ACCURACY_CHANGE + TOLERANCE
    entry = {"accuracy": score, "n_images": n_images, "accuracy_change": change, "size_bytes": len(flatbuffer),
             "latency_ms": latency_ms(flatbuffer, scored.first), "convert_s": round(convert_s, 2), "kept": kept}
    if kept:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{variant}.tflite").write_bytes(flatbuffer)
        entry["file"] = f"{out_dir.name}/{variant}.tflite"
    else:
        entry["reason"] = (f"accuracy {score:.4f} is {change:+.4f} from the Keras model's {keras_accuracy:.4f}, "
                           f"beyond ±{MAX_ACCURACY_CHANGE}")
    log.info("tflite: %s %s, accuracy %.4f (%+.4f), %.2f MB, %.2f ms/image", variant,
             "kept" if kept else "dropped", score, change, len(flatbuffer) / 1e6, entry["latency_ms"])
    return entry


def _scoring_model(saved_model: Path, batch: np.ndarray, expected: np.ndarray, out_dir: Path) -> dict:
    """Convert the embeddings signature, keep it when it answers as the float32 variant did on `batch` (`expected`;
    see the module)."""
    try:
        flatbuffer = convert(saved_model, "float32", EMBEDDINGS_SIGNATURE)
    except Exception as error:  # an older export without the signature, or a converter refusal
        return {"kept": False, "reason": f"not convertible: {type(error).__name__}: {_first_line(error)}"}
    outputs = signature_outputs(flatbuffer, batch)
    difference = float(np.max(np.abs(outputs["probabilities"] - expected)))
    entry = {"size_bytes": len(flatbuffer), "embedding_size": int(outputs["embeddings"].shape[-1]),
             "max_probability_difference": difference, "n_images": len(batch),
             "kept": difference <= SCORING_TOLERANCE}
    if entry["kept"]:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SCORING_FILE).write_bytes(flatbuffer)
        entry["file"] = f"{out_dir.name}/{SCORING_FILE}"
    else:
        entry["reason"] = f"its probabilities differ from float32's by {difference:.2g} > {SCORING_TOLERANCE:g}"
    log.info("tflite: scoring model (probabilities and embeddings) %s", "kept" if entry["kept"] else entry["reason"])
    return entry


def signature_outputs(flatbuffer: bytes, images: np.ndarray) -> dict[str, np.ndarray]:
    """The embeddings signature's named outputs for a batch."""
    interpreter, _ = _interpreter(flatbuffer, os.cpu_count())
    runner = interpreter.get_signature_runner(EMBEDDINGS_SIGNATURE)
    return {name: np.asarray(value) for name, value in runner(**{PIXELS_INPUT: images.astype(np.float32)}).items()}


def _interpreter(flatbuffer: bytes, threads: int | None = None):
    """A LiteRT interpreter for the model (its default threads unless given), and the image size it takes."""
    from ai_edge_litert.interpreter import Interpreter

    from tasks.tf_logging import quiet_stderr

    with quiet_stderr():  # LiteRT prints its XNNPACK "INFO: Created ... delegate" line to stderr
        interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter, int(interpreter.get_input_details()[0]["shape"][1])


def _invoke(interpreter, images: np.ndarray) -> np.ndarray:
    """Probabilities for a batch; the input is resized when the batch size changes."""
    [given] = interpreter.get_input_details()
    if tuple(given["shape"]) != images.shape:
        interpreter.resize_tensor_input(given["index"], images.shape)
        interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], images.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _first_line(error: Exception) -> str:
    """The converter's first message line, without MLIR's source locations (which hide the op's name)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return MLIR_LOCATION.sub(" ", lines[0])[:300] if lines else "no message"
