"""Serving check: the artifacts about to be published answer like the model that was evaluated.

Evaluate keeps a golden batch: the first GOLDEN_SIZE test records (their paths)
and the probabilities the evaluated model gave them. Before a version is
published, a fresh Python process, which has seen neither training nor
evaluation (no traced functions, no cached layers), rebuilds the Keras
classifier from its folder (spec + weights: nothing is deserialised as code, see
tasks/classifier.py) and loads the SavedModel through its serving signature,
runs the golden batch through both, and reports how far each lands from the
stored probabilities. The SavedModel is asked twice: with decoded pixels
(`serving_default`) and with the golden images' original files through its
encoded-bytes signature (prepared as a client must, tasks.images.client_bytes),
which decodes in the graph. A load failure or a difference above TOLERANCE
blocks publishing: what would be served is not what was measured.

Run as `python -m tasks.serving_check --model ... --saved-model ... --golden
... --records ... --out result.json`; `check_serving` does that and judges (`started`
lets the caller work beside the process).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tasks.errors import PublishError
from tasks.scratch import scratch_dir
from tasks.serving_export import BYTES_INPUT, BYTES_SIGNATURE, PIXELS_SIGNATURE

GOLDEN_SIZE = 32
TOLERANCE = 1e-4  # float32 round-off between graph and eager runs stays far below this
CHILD_TIMEOUT_S = 600
MESSAGE_CHARS = 500
KERAS_CAUSE = "Exception encountered: "
KERAS_CONFIG_DUMP = " Full object config"
KERAS_ARTIFACT = "model"
SAVED_MODEL_ARTIFACT = "saved_model"
BYTES_ARTIFACT = "saved_model_bytes"
FIXES = {
    KERAS_ARTIFACT: "the classifier folder must rebuild from its classifier.json with the weights it holds: "
                    "re-run the train (and fine_tune) step for this run",
    SAVED_MODEL_ARTIFACT: "the SavedModel export does not serve what was evaluated: re-run evaluate and publish "
                          "for this run, and check that the model has no training-only behaviour at inference",
    BYTES_ARTIFACT: f"the SavedModel's {BYTES_SIGNATURE} signature does not decode the original files as the "
                    "pipeline's decoder (tasks.images) did: re-run publish; if it persists, the in-graph decoder "
                    "(tasks.images.decode_in_graph) disagrees with to_rgb on these files",
}


def golden_batch(probabilities: np.ndarray, paths: list[str], image_size: int) -> bytes:
    """The golden batch as evaluate stores it: the first test records' paths and their probability rows.

    Images are not stored: the check decodes them from the test split again, the
    same way evaluate did, and the paths prove it picked the same records.
    """
    count = min(GOLDEN_SIZE, len(paths))
    buffer = io.BytesIO()
    np.savez(buffer, indices=np.arange(count), paths=np.asarray(paths[:count], dtype=str),
             probabilities=np.asarray(probabilities[:count], dtype=np.float32), image_size=np.int64(image_size))
    return buffer.getvalue()


def check_serving(model: Path, saved_model: Path, golden: Path, test_records: Path, where: str) -> dict:
    """Run the golden batch through both artifacts in a fresh process; PublishError on a failure or mismatch.

    `where` names the version in messages. Returns {artifact: max abs difference},
    the batch size and the tolerance, for metrics.json and the approval request.
    """
    with started(model, saved_model, golden, test_records, where) as result:
        return result()


@contextlib.contextmanager
def started(model: Path, saved_model: Path, golden: Path, test_records: Path, where: str
            ) -> Iterator[Callable[[], dict]]:
    """The serving check, started in its fresh process while the caller works beside it; the function yielded
    waits for the process and judges as check_serving does.

    The process is mostly one core's imports and loads (TensorFlow, the classifier,
    the SavedModel: about 16 s of a 2-core publish), so publish samples the reference
    embeddings and converts and scores the TFLite variants beside it instead of after
    it (the demo's publish: 78 s against 85 s, the mean of three alternated pairs).
    Leaving the block first (an error in the caller's work) kills the process.
    """
    with scratch_dir("serving-check") as scratch:
        out, errors = scratch / "result.json", scratch / "stderr.txt"
        command = [sys.executable, "-m", "tasks.serving_check", "--model", str(model), "--saved-model",
                   str(saved_model), "--golden", str(golden), "--records", str(test_records), "--out", str(out)]
        with errors.open("w") as stderr:  # a file, not a pipe: TensorFlow's log would fill a pipe nobody reads
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            yield lambda: _judged(process, out, errors, where)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _judged(process: subprocess.Popen, out: Path, errors: Path, where: str) -> dict:
    """Wait for the check's process and judge its answers (PublishError on a failure or mismatch)."""
    try:
        returncode = process.wait(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise PublishError(f"serving check of {where}: the fresh process did not finish in {CHILD_TIMEOUT_S}s; "
                           "check the worker's load and memory, then re-run publish") from error
    if returncode != 0 or not out.exists():
        raise PublishError(f"serving check of {where}: the fresh process failed (exit {returncode}): "
                           f"{errors.read_text(errors='replace').strip()[-2000:]}")
    answers = json.loads(out.read_text())
    problems = []
    for artifact, answer in answers["artifacts"].items():
        if "error" in answer:
            problems.append(f"{artifact} cannot be loaded and run ({answer['error']}); {FIXES[artifact]}")
        elif not answer["max_abs_diff"] <= TOLERANCE:
            problems.append(f"{artifact} answers the golden batch up to {answer['max_abs_diff']:.3g} away from the "
                            f"evaluated probabilities (tolerance {TOLERANCE:g}); {FIXES[artifact]}")
    if problems:
        raise PublishError(f"serving check of {where} failed, so it is not published: {'; '.join(problems)}")
    return {"max_abs_diff": {artifact: answer["max_abs_diff"] for artifact, answer in answers["artifacts"].items()},
            "n_images": answers["n_images"], "tolerance": TOLERANCE}


def _golden_images(golden: dict, test_records: Path) -> np.ndarray:
    """The golden batch's images, decoded from the test split; refuses a split whose first records differ."""
    from tasks.records import image_dataset

    count = len(golden["paths"])
    images, _, paths = next(iter(image_dataset(test_records, int(golden["image_size"]), count, with_paths=True)))
    found = [path.decode("utf-8") for path in paths.numpy()]
    if found != list(golden["paths"]):
        raise PublishError(f"{test_records}: the first {count} test records are not the golden batch evaluate "
                           "stored; re-run evaluate for this run")
    return images.numpy()


def _golden_files(golden: dict, test_records: Path) -> list[bytes]:
    """The golden batch's original files, as stored beside their decoded pixels in the test split."""
    from tasks.records import originals

    found = originals(test_records, len(golden["paths"]))
    if [path for _, path in found] != list(golden["paths"]):
        raise PublishError(f"{test_records}: the first {len(golden['paths'])} test records are not the golden batch "
                           "evaluate stored; re-run evaluate for this run")
    return [original for original, _ in found]


def _keras_probabilities(model: Path, images: np.ndarray) -> np.ndarray:
    from tasks import classifier, settings

    loaded = classifier.load(model, settings.load().cache_dir).model
    return np.asarray(loaded(images, training=False))


@functools.cache
def _loaded(saved_model: Path):
    """The SavedModel, scanned and loaded once for both of its checks (a failure is raised to each)."""
    import tensorflow as tf

    from tasks.savedmodel_scan import check_saved_model

    check_saved_model(saved_model, f"SavedModel {saved_model}")
    return tf.saved_model.load(str(saved_model))


def _saved_model_probabilities(saved_model: Path, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    serve = _loaded(saved_model).signatures[PIXELS_SIGNATURE]
    [name] = serve.structured_input_signature[1]
    [output] = serve(**{name: tf.constant(images)}).values()
    return output.numpy()


def _bytes_probabilities(saved_model: Path, files: list[bytes]) -> np.ndarray:
    """The bytes signature's answer for the files a client would send (tasks.images.client_bytes)."""
    import tensorflow as tf

    from tasks.images import client_bytes

    serve = _loaded(saved_model).signatures[BYTES_SIGNATURE]
    return serve(**{BYTES_INPUT: tf.constant([client_bytes(data) for data in files])})["probabilities"].numpy()


def _answer(run, path: Path, inputs, expected: np.ndarray) -> dict:
    """One artifact's verdict: its largest difference from the evaluation, or why it could not answer."""
    try:
        probabilities = run(path, inputs)
    except Exception as error:  # any load or call failure is the finding, reported by the parent
        return {"error": _cause(error)}
    if probabilities.shape != expected.shape:
        return {"error": f"output shape {probabilities.shape}, evaluated {expected.shape}"}
    return {"max_abs_diff": float(np.max(np.abs(probabilities - expected)))}


def _cause(error: Exception) -> str:
    """The error in a line: Keras wraps the real cause ("Could not locate class ...") after a config dump."""
    cause = str(error).rpartition(KERAS_CAUSE)[2].partition(KERAS_CONFIG_DUMP)[0]
    return f"{type(error).__name__}: {cause.strip()[:MESSAGE_CHARS]}"


def main(argv: list[str] | None = None) -> None:
    """The fresh-process side: load both artifacts, run the golden batch, write what each answered."""
    parser = argparse.ArgumentParser(prog="python -m tasks.serving_check", description=main.__doc__)
    for flag in ("--model", "--saved-model", "--golden", "--records", "--out"):
        parser.add_argument(flag, required=True, type=Path)
    args = parser.parse_args(argv)
    with np.load(args.golden) as stored:
        golden = {key: stored[key] for key in stored.files}
    images = _golden_images(golden, args.records)
    expected = golden["probabilities"]
    answers = {
        KERAS_ARTIFACT: _answer(_keras_probabilities, args.model, images, expected),
        SAVED_MODEL_ARTIFACT: _answer(_saved_model_probabilities, args.saved_model, images, expected),
        BYTES_ARTIFACT: _answer(_bytes_probabilities, args.saved_model, _golden_files(golden, args.records),
                                expected),
    }
    args.out.write_text(json.dumps({"artifacts": answers, "n_images": len(images)}))


if __name__ == "__main__":
    main()
