"""A published model as batch scoring runs it: found in the registry, checked against its checksums, loaded.

Only published artefacts are scored, and only from a publish location of the
deployment (tasks.batch_config checks the location; this module reads nothing
else). The files the engine needs are downloaded once per worker into its cache
and every file is matched against the version's `checksums.json` before it is
loaded, so an altered or half-uploaded version is refused, not run.

The engine is the TFLite float32 variant through the LiteRT interpreter: bench/predict.py
measured it 2.6x faster than the SavedModel with equal predictions (top-1 labels
all equal, probabilities within 1e-5), while the float16 variant, hardly faster,
changed 0.2 % of the top-1 labels (README "Scoring new images"). A version without
the float32 variant (the converter refused the model, or it lost accuracy and was
not kept) is scored through its SavedModel instead.

Each scored batch also yields its embeddings (the head's dense-layer input), for
the batch's embedding shift: from `tflite/scoring.tflite` (the float32 model of the
`serve_embeddings` signature, tasks/tflite_export.py) or the SavedModel's
`serve_embeddings`; and the version's reference sample of training embeddings
(tasks/embedding_reference.py) is fetched and verified like the model files. A
version published before these has neither: it is scored as before, without embeddings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tasks import embedding_reference, registry, storage
from tasks.errors import ScoringError
from tasks.serving_export import EMBEDDINGS_SIGNATURE, PIXELS_INPUT

log = logging.getLogger(__name__)

TFLITE_FLOAT32 = "tflite-float32"
SAVED_MODEL = "saved_model"
ENGINE = TFLITE_FLOAT32
ENGINE_FILES = {TFLITE_FLOAT32: "tflite/float32.tflite", SAVED_MODEL: "saved_model/"}
SCORING_FILE = "tflite/scoring.tflite"  # float32, probabilities and embeddings (tasks.tflite_export.SCORING_FILE)
SPEC_FILE = "model/classifier.json"
SERVING_SIGNATURE = "serving_default"
MAX_LANES = 8  # scoring lanes per task (tasks.batch_scoring.score); more cores become threads per lane
# a batch's probabilities and its embeddings (None from a version published without them)
Scorer = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray | None]"]


@dataclass(frozen=True)
class PublishedModel:
    """One verified published version, ready on this worker: what it predicts, at which size, with what."""

    model_name: str
    version: str
    version_uri: str
    classes: tuple[str, ...]
    image_size: int
    engine: str
    path: Path  # the .tflite file or the SavedModel folder, in this worker's cache
    reference: Path | None = None  # the verified reference sample of training embeddings, if the version has one


def resolve_version(publish_uri: str, model_name: str, version: str | None) -> str:
    """The version a run scores with: the one asked for, or the champion's at the time of asking; it must be
    complete (have its checksums.json)."""
    if not version:
        champion = registry.read_champion(publish_uri, model_name)
        if champion is None:
            raise ScoringError(f"{storage.join(publish_uri, model_name)} has no champion yet; publish and promote "
                               "a model first (DAG transfer_learning), or give model_version")
        version = str(champion["version"])
    if not storage.exists(storage.join(version_uri(publish_uri, model_name, version), registry.CHECKSUMS)):
        raise ScoringError(f"{version_uri(publish_uri, model_name, version)} is not a complete published version; "
                           "give one listed by `python -m tasks.registry list`, or leave model_version empty")
    return version


def version_uri(publish_uri: str, model_name: str, version: str) -> str:
    return storage.join(publish_uri, model_name, "versions", version)


def fetch(publish_uri: str, model_name: str, version: str, cache_dir: str, engine: str = ENGINE) -> PublishedModel:
    """Download (once) and verify what `engine` needs of a complete version; falls back to the SavedModel."""
    uri = version_uri(publish_uri, model_name, version)
    checksums_uri = storage.join(uri, registry.CHECKSUMS)
    if not storage.exists(checksums_uri):
        raise ScoringError(f"{uri} is not a complete published version (no {registry.CHECKSUMS}); give a version "
                           f"listed by `python -m tasks.registry list`, or leave model_version empty")
    checksums = storage.read_json(checksums_uri)
    if engine == TFLITE_FLOAT32 and ENGINE_FILES[TFLITE_FLOAT32] not in checksums:
        log.info("scoring: %s has no %s (not convertible or not kept); scoring through its SavedModel", uri,
                 ENGINE_FILES[TFLITE_FLOAT32])
        engine = SAVED_MODEL
    local = Path(cache_dir) / "published" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    engine_file = SCORING_FILE if engine == TFLITE_FLOAT32 and SCORING_FILE in checksums else ENGINE_FILES[engine]
    wanted = [name for name in checksums if name in (SPEC_FILE, embedding_reference.FILE)
              or name.startswith(engine_file)]
    if not any(name.startswith(engine_file) for name in wanted):
        raise ScoringError(f"{uri} has neither {ENGINE_FILES[TFLITE_FLOAT32]} nor a SavedModel; re-publish it")
    for name in wanted:
        _verified_copy(storage.join(uri, name), local / name, checksums[name])
    spec = json.loads((local / SPEC_FILE).read_text())
    reference = local / embedding_reference.FILE if embedding_reference.FILE in checksums else None
    return PublishedModel(model_name, version, uri, tuple(spec["classes"]), int(spec["image_size"]), engine,
                          local / engine_file.rstrip("/"), reference)


def fetch_reference(publish_uri: str, model_name: str, version: str, cache_dir: str) -> Path | None:
    """The version's reference sample of training embeddings, verified against its checksums (None: it has none)."""
    uri = version_uri(publish_uri, model_name, version)
    checksums = storage.read_json(storage.join(uri, registry.CHECKSUMS))
    if embedding_reference.FILE not in checksums:
        return None
    local = Path(cache_dir) / "published" / hashlib.sha256(uri.encode()).hexdigest()[:24] / embedding_reference.FILE
    _verified_copy(storage.join(uri, embedding_reference.FILE), local, checksums[embedding_reference.FILE])
    return local


def scorer(model: PublishedModel, threads: int | None = None) -> Scorer:
    """A function from a batch of float32 RGB images in [0, 255] to (probability rows, embedding rows or None)
    (`threads` None = all cores)."""
    threads = threads or os.cpu_count() or 1
    if model.engine == TFLITE_FLOAT32:
        return tflite_scorer(model.path, threads)
    return saved_model_scorer(model.path)


def lanes(model: PublishedModel, cores: int | None = None) -> list[Scorer]:
    """The scorers batch scoring runs side by side (tasks.batch_scoring.score), each decoding its own batches.

    TFLite: one interpreter per core, single-threaded, up to MAX_LANES; beyond
    that the cores are shared out as threads per interpreter (each lane holds
    its own packed weights and a batch, and its decoding takes the GIL: 64 lanes
    would cost memory and contend). The SavedModel is one scorer, TensorFlow
    spreading it over the cores itself. Interpreters are not shared between threads.
    """
    cores = cores or os.cpu_count() or 1
    count = min(cores, MAX_LANES) if model.engine == TFLITE_FLOAT32 else 1
    return [scorer(model, cores // count) for _ in range(count)]


def tflite_scorer(path: Path, threads: int) -> Scorer:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    if EMBEDDINGS_SIGNATURE in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(EMBEDDINGS_SIGNATURE)  # resizes its input to each batch

        def both(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            outputs = runner(**{PIXELS_INPUT: np.ascontiguousarray(images, dtype=np.float32)})
            return np.array(outputs["probabilities"]), np.array(outputs["embeddings"])

        return both
    interpreter.allocate_tensors()
    [given] = interpreter.get_input_details()
    output = interpreter.get_output_details()[0]["index"]

    def score(images: np.ndarray) -> tuple[np.ndarray, None]:
        if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
            interpreter.resize_tensor_input(given["index"], images.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], np.ascontiguousarray(images, dtype=np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(output).copy(), None

    return score


def saved_model_scorer(path: Path) -> Scorer:
    """The SavedModel's embeddings signature (its serving one when it has none), after the scan that refuses
    graphs touching files, Python or processes."""
    import tensorflow as tf

    from tasks.savedmodel_scan import check_saved_model

    check_saved_model(path, f"the published SavedModel {path}")
    signatures = tf.saved_model.load(str(path)).signatures
    if EMBEDDINGS_SIGNATURE in signatures:
        both = signatures[EMBEDDINGS_SIGNATURE]

        def score_both(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            outputs = both(**{PIXELS_INPUT: tf.constant(images, dtype=tf.float32)})
            return outputs["probabilities"].numpy(), outputs["embeddings"].numpy()

        return score_both
    serve = signatures[SERVING_SIGNATURE]
    [name] = serve.structured_input_signature[1]

    def score(images: np.ndarray) -> tuple[np.ndarray, None]:
        [probabilities] = serve(**{name: tf.constant(images, dtype=tf.float32)}).values()
        return probabilities.numpy(), None

    return score


def _verified_copy(uri: str, target: Path, sha256: str) -> None:
    """`target` holds the object at `uri` with this sha256: kept when it already does, else fetched and checked."""
    if target.is_file() and storage.sha256_file(target) == sha256:
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # workers may share a cache
    storage.download(uri, partial)
    found = storage.sha256_file(partial)
    if found != sha256:
        partial.unlink()
        raise ScoringError(f"{uri} does not match the sha256 in its version's {registry.CHECKSUMS} ({found} != "
                           f"{sha256}): the published version was altered; it is not loaded")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(partial, target)
