"""Batch scoring, the parts the three steps of `batch_predict` stand on.

- Sources: a local folder, an `s3://` prefix, or an archive (fetched and extracted once per worker). Images
  are named by their path relative to the source, the name every output uses.
- Shards are keyed by content: the model version, the decoder version, the scorer, top-k and every image's
  (path, sha256). A shard whose key already has predictions is not scored again, by any run; a changed image
  changes its shard's key, so that shard is scored again.
- Predictions per image: path, sha256, the top-k labels with probabilities, model and decoder version, as
  Parquet and CSV (cells a spreadsheet would run as formulas made inert, as in the report).
- Memory: a shard is read twice, never held whole. First every file is read and hashed (the key), keeping
  only the hashes; then, unless the key was scored before, the images are read again batch by batch, each
  checked against its first hash, decoded and scored by one of the model's lanes (`score`): each lane holds
  one file and one batch of pixels at a time, whatever the shard size.
- The summary: counts per predicted class, the confidence histogram, unreadable files, the shift of the
  batch's confidence against the model's own test set (`confidence_shift`, with its rule), and the
  embedding shift of the batch against a sample of the model's training images (`batch_embedding_shift`).
- Embeddings: each shard keeps the embeddings of a bounded sample of its images, the ones whose seeded
  hash of (path, sha256) ranks lowest (`sample_rank`): a retried shard keeps the same rows, and the run's
  sample, the lowest ranks over all shards, is a uniform sample of the batch whatever the sharding.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from queue import Empty, SimpleQueue
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from tasks import images, settings, storage
from tasks.errors import DatasetError, ImageDecodeError, StorageError, TransientError
from tasks.redact import redact_uri
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SCORER = "batch-scoring-2"  # bump when the way probabilities are computed changes: every shard is scored again
BATCH = 64
# decoded pictures of another size a lane holds before resizing them: a batch of 12 MP photos would be 2.3 GB
RESIZE_HELD_BYTES = 64 * 2**20
HASH_CHUNK = 16  # files hashed per thread-pool task (a task costs about what hashing a small file does)
SHARD_RECORD = "shard.json"  # written last: a shard folder without it is unfinished
PREDICTIONS = "predictions"
EMBEDDINGS = "embeddings.npy"  # a shard's sample of embeddings, float16, rows in SHARD_RECORD's "paths" order
EMBEDDING_SAMPLE = 1000  # rows a shard keeps and the run compares (with the version's reference sample)
EMBEDDING_DTYPE = np.float16
SAMPLE_SEED = "batch-embedding-sample-1"
# embedding shift rule: the domain classifier's AUC (training sample vs batch sample) must be above the noise
# band it reaches on randomly relabelled domains (tasks.data_changes.embedding_shift) and above this floor, so a
# large batch does not flag a slight difference
EMBEDDING_AUC_THRESHOLD = 0.75
HISTOGRAM_BINS = 10
THUMBNAIL_PX = 128
# shift rule: the two-sample Kolmogorov-Smirnov distance between the batch's and the test set's top-1
# confidences must exceed both its critical value at alpha = 0.01 and an effect-size floor, so that a large
# batch does not flag a negligible difference and a small one does not flag noise
KS_ALPHA_COEFFICIENT = 1.628  # c(alpha) for alpha = 0.01
KS_MIN_DISTANCE = 0.1
# the scored probabilities match the published classifier's on the golden batch within the serving check's own
# tolerance (tests/test_batch_predict.py)
GOLDEN_TOLERANCE = 1e-4
TEST_PREDICTIONS = "report/predictions.csv"  # per test image, written by evaluate into every published version


@dataclass(frozen=True)
class Read:
    """One image of a shard after reading: its bytes and sha256, or why it could not be read."""

    path: str
    data: bytes | None
    sha256: str | None
    error: str = ""


# ---------------------------------------------------------------- sources and listing

def is_archive(source: str) -> bool:
    return urlparse(source).path.lower().endswith(ARCHIVE_SUFFIXES)


def images_root(source: str, cache_dir: str) -> str:
    """Where the source's images can be read on this worker: the folder, the s3:// prefix, or the extracted
    archive in this worker's cache (extracted once)."""
    if is_archive(source):
        return str(_extracted(source, cache_dir))
    if storage.is_s3(source):
        return source.rstrip("/") + "/"
    root = storage.local_path(source)
    if not root.is_dir():
        raise DatasetError(f"images={source!r} is not a folder; give a folder, an s3:// prefix or an archive")
    return str(root)


def list_images(root: str) -> tuple[list[str], list[str]]:
    """(image paths, other files) below a root, relative to it and sorted; hidden files are left out.

    A listed key that could leave a folder it is joined to ('..', '//') counts as
    an other file: it is reported, never read.
    """
    if storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        relatives = [uri[len(prefix):] for uri in storage.list_files(prefix)]
    else:
        relatives = _local_files(str(storage.local_path(root)))
    found, others = [], []
    for relative in relatives:
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        image = relative.lower().endswith(IMAGE_SUFFIXES) and not storage.escape_reason(relative)
        (found if image else others).append(relative)
    return sorted(found), sorted(others)


def _local_files(root: str) -> list[str]:
    """The files below a local folder as relative POSIX paths, what `storage.list_files` finds, from directory
    entries (storage.local_files)."""
    prefix = os.path.join(root, "")
    return [entry.path[len(prefix):].replace(os.sep, "/") for entry in storage.local_files(root)]


def shard_bounds(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) of each shard of `count` images, in listing order."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def read_images(root: str, paths: list[str], pool: ThreadPoolExecutor) -> list[Read]:
    """Read and hash every image, in parallel; a file gone or refused is a Read with its error (the store being
    down is not: that raises, and the task is retried)."""
    return list(pool.map(lambda path: _read(root, path), paths))


def hash_images(root: str, paths: list[str]) -> list[Read]:
    """`read_images` keeping only the hashes (`data` None): memory holds one file per thread, not the shard.

    An s3:// root is read by a `worker_pool` (a round trip per file: latency bounds it); a local one by this thread
    alone, which is faster: 2,500 small JPEGs in 0.07 s against 0.17-0.33 s by two threads handing chunks over
    (2-core VM, files in the page cache, as a shard's are once listed or written)."""
    if not storage.is_s3(root):
        return [_hashed(root, path) for path in paths]

    def hashed(chunk: list[str]) -> list[Read]:
        return [_hashed(root, path) for path in chunk]

    chunks = [paths[start:start + HASH_CHUNK] for start in range(0, len(paths), HASH_CHUNK)]
    with worker_pool() as pool:
        return [read for chunk in pool.map(hashed, chunks) for read in chunk]


def _hashed(root: str, path: str) -> Read:
    """A file's Read without its bytes: they are let go when this returns, before the thread reads the next file."""
    read = _read(root, path)
    return Read(read.path, None, read.sha256, read.error)


def _read(root: str, path: str) -> Read:
    try:
        data = _read_bytes(root, path)
    except StorageError as error:
        return Read(path, None, None, f"cannot be read: {error}")
    return Read(path, data, hashlib.sha256(data).hexdigest())


def _read_bytes(root: str, path: str) -> bytes:
    """A listed image's bytes (a FIFO or folder in its place is an error, not a hang: storage.read_bytes). `path`
    passed the listing's check (`storage.escape_reason`), so it stays below the root."""
    return storage.read_bytes(storage.join(root, path))


def shard_key(model_version_uri: str, decoder_version: str, top_k: int, reads: list[Read]) -> str:
    """The content key of a shard's predictions: same model, decoder, scorer, top-k and images -> same key."""
    content = {"model": model_version_uri, "decoder": decoder_version, "scorer": SCORER, "top_k": top_k,
               "images": [[read.path, read.sha256 or f"unreadable: {read.error}"] for read in reads]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- scoring

def score(root: str, reads: list[Read], image_size: int, lanes: list[Callable]
          ) -> tuple[list[Read], np.ndarray, np.ndarray | None, list[dict]]:
    """(scored reads, their probabilities, their embeddings or None, unreadable files with the reason).

    `reads` are hashed (`hash_images`). Each model of `lanes` runs in a thread
    of its own that takes the next batch, reads each readable image again,
    checks it against its hash, decodes it by the project's one decoder
    (`to_rgb`) and resizes it by its one `resize` (a picture already at the
    model's size goes into the batch as it is: `resize` leaves it unchanged,
    tests pin that, and TensorFlow is not even imported), then runs its model on
    the batch, and takes the next: a lane holds one file and one batch of pixels
    at a time. A model maps a pixel batch to (probabilities, embeddings or None).

    Lanes, because decoding and the model share the cores: one interpreter on
    every core with the next batch decoded beside it lost about a third of the
    interpreter's rate (each of its parallel operations waits for the thread the
    decoder took), one single-threaded interpreter per core with its own
    decoding kept 0.8 of it (bench/predict.py).
    """
    readable = [read for read in reads if read.sha256 is not None]
    unreadable = [{"path": read.path, "reason": read.error} for read in reads if read.sha256 is None]
    batches = [readable[start:start + BATCH] for start in range(0, len(readable), BATCH)]
    limit = settings.load().limits.max_image_pixels
    results: list = [None] * len(batches)
    waiting: SimpleQueue[int] = SimpleQueue()
    for index in range(len(batches)):
        waiting.put(index)
    failed = threading.Event()

    def lane(model: Callable) -> None:
        while not failed.is_set():
            try:
                index = waiting.get_nowait()
            except Empty:
                return
            try:
                results[index] = _scored_batch(root, batches[index], image_size, limit, model)
            except BaseException:
                failed.set()  # the other lanes stop at their next batch
                raise

    with ThreadPoolExecutor(max_workers=len(lanes)) as threads:
        for running in [threads.submit(lane, model) for model in lanes]:
            running.result()
    scored = [read for batch, (_, _, reasons) in zip(batches, results, strict=True)
              for n, read in enumerate(batch) if n not in reasons]
    unreadable += [{"path": batch[n].path, "reason": reason}
                   for batch, (_, _, reasons) in zip(batches, results, strict=True) for n, reason in reasons.items()]
    outputs = [(probabilities, embeddings) for probabilities, embeddings, _ in results if probabilities is not None]
    probabilities = np.concatenate([p for p, _ in outputs]) if outputs else np.zeros((0, 0), np.float32)
    embeddings = (np.concatenate([e for _, e in outputs]) if outputs and all(e is not None for _, e in outputs)
                  else None)
    return scored, probabilities, embeddings, sorted(unreadable, key=lambda item: item["path"])


def _scored_batch(root: str, batch: list[Read], image_size: int, max_pixels: int, model: Callable
                  ) -> tuple[np.ndarray | None, np.ndarray | None, dict[int, str]]:
    """(probabilities, embeddings, why each row left out could not be decoded) of one batch, read and decoded here;
    (None, None, reasons) when no image of it decodes. Pictures of another size than the model's are resized a
    few at a time (`_resize_into`), so a lane holds at most RESIZE_HELD_BYTES of them, not a batch of photos."""
    pixels = np.empty((len(batch), image_size, image_size, 3), np.float32)
    reasons: dict[int, str] = {}
    held: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    held_bytes = 0
    for row, read in enumerate(batch):
        picture, reason = _read_decoded(root, read, max_pixels, pixels, row)
        if reason:
            reasons[row] = reason
        elif picture is not None:
            held.setdefault(picture.shape, []).append((row, picture))
            held_bytes += picture.nbytes
            if held_bytes > RESIZE_HELD_BYTES:
                _resize_into(pixels, held, image_size)
                held_bytes = 0
    _resize_into(pixels, held, image_size)
    if reasons:
        pixels = pixels[[n for n in range(len(batch)) if n not in reasons]]
    if not len(pixels):
        return None, None, reasons
    probabilities, embeddings = model(pixels)
    return probabilities, embeddings, reasons


def _resize_into(pixels: np.ndarray, held: dict[tuple, list[tuple[int, np.ndarray]]], image_size: int) -> None:
    """The held pictures through the one `resize` (one call per size: small pictures cost less together) into
    their rows of `pixels`; `held` is emptied."""
    for group in held.values():
        pixels[[row for row, _ in group]] = np.asarray(images.resize(np.stack([p for _, p in group]), image_size))
    held.clear()


def _read_decoded(root: str, read: Read, max_pixels: int, pixels: np.ndarray, row: int
                  ) -> tuple[np.ndarray | None, str]:
    """An image read again and decoded; its bytes are dropped here. A picture already at the model's size is
    written into `pixels[row]` (None, ""); any other is returned for `resize`; one that does not decode gives
    (None, reason). A file that changed since it was hashed would be scored under another file's key:
    TransientError, and the retried shard hashes it again."""
    again = _read(root, read.path)
    if again.sha256 != read.sha256:
        raise TransientError(f"{read.path} changed while its shard was scored (sha256 {read.sha256} before, "
                             f"{again.sha256 or again.error} now); the shard is scored again on retry")
    picture, reason = _to_rgb(again.data, max_pixels)
    if picture is not None and picture.shape == pixels.shape[1:]:
        pixels[row] = picture  # `resize` to the size a picture already has changes no value (tests pin it)
        return None, ""
    return picture, reason


def _to_rgb(data: bytes, max_pixels: int) -> tuple[np.ndarray | None, str]:
    try:
        return images.to_rgb(data, max_pixels=max_pixels), ""
    except ImageDecodeError as error:
        return None, f"cannot be decoded: {error}"


def predictions_table(scored: list[Read], probabilities: np.ndarray, classes: tuple[str, ...], top_k: int,
                      model_name: str, version: str, decoder_version: str):
    """One row per scored image: path, sha256, label_i/probability_i for i = 1..k (most probable first), model
    and decoder version."""
    import pandas as pd

    k = min(top_k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k] if len(scored) else np.zeros((0, k), int)
    names = np.asarray(classes, dtype=object)
    columns: dict = {"path": [read.path for read in scored], "sha256": [read.sha256 for read in scored]}
    for rank in range(k):
        columns[f"label_{rank + 1}"] = names[order[:, rank]] if len(scored) else []
        columns[f"probability_{rank + 1}"] = (np.take_along_axis(probabilities, order[:, rank:rank + 1], axis=1)[:, 0]
                                              .astype(np.float64) if len(scored) else np.zeros(0))
    table = pd.DataFrame(columns)
    table["model_name"], table["model_version"], table["decoder_version"] = model_name, version, decoder_version
    return table


def write_predictions(table, prefix: str) -> dict[str, str]:
    """`<prefix>.parquet` and `<prefix>.csv`, each written whole (one PUT, or write-then-rename)."""
    from tasks.csv_cells import write_csv

    parquet, csv = io.BytesIO(), io.StringIO()
    table.to_parquet(parquet, index=False)
    write_csv(table, csv)
    uris = {"parquet": f"{prefix}.parquet", "csv": f"{prefix}.csv"}
    storage.write_bytes(uris["parquet"], parquet.getvalue())
    storage.write_bytes(uris["csv"], csv.getvalue().encode("utf-8"))
    return uris


def sample_rank(path: str, sha256: str) -> str:
    """An image's place in the embedding sample (lowest first): a seeded hash of its name and content."""
    return hashlib.sha256(f"{SAMPLE_SEED}\0{path}\0{sha256}".encode()).hexdigest()


def embedding_sample(scored: list[Read], embeddings: np.ndarray, rows: int = EMBEDDING_SAMPLE
                     ) -> tuple[list[str], np.ndarray]:
    """(paths, float16 embeddings) of the `rows` scored images of lowest `sample_rank`, in that order."""
    order = sorted(range(len(scored)), key=lambda n: sample_rank(scored[n].path, scored[n].sha256))[:rows]
    return [scored[n].path for n in order], np.asarray(embeddings)[order].astype(EMBEDDING_DTYPE)


def write_embedding_sample(paths: list[str], sample: np.ndarray, uri: str) -> dict:
    """The sample as a .npy at `uri` (one write); returns its record entry: file, sha256, paths in row order."""
    buffer = io.BytesIO()
    np.save(buffer, sample, allow_pickle=False)
    storage.write_bytes(uri, buffer.getvalue())
    return {"file": uri, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "paths": paths}


def read_embedding_sample(entry: dict, uri: str) -> tuple[list[str], np.ndarray]:
    """A shard's sample at `uri` (its folder's, never where the record points), checked against the sha256 its
    record gives (no pickles)."""
    data = storage.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DatasetError(f"{uri} does not match the sha256 in its shard record; delete the shard folder and "
                           "score it again")
    sample = np.load(io.BytesIO(data), allow_pickle=False)
    if len(sample) != len(entry["paths"]):
        raise DatasetError(f"{uri} has {len(sample)} rows for {len(entry['paths'])} paths; delete the shard "
                           "folder and score it again")
    return list(entry["paths"]), sample


def merged_sample(samples: list[tuple[list[str], np.ndarray]], sha256_of: dict[str, str],
                  rows: int = EMBEDDING_SAMPLE) -> np.ndarray:
    """The run's sample: the `rows` lowest-ranked images over every shard's sample, as float32."""
    strays = sorted({path for paths, _ in samples for path in paths} - set(sha256_of))
    if strays:
        raise DatasetError(f"shard embedding samples name images the run did not score ({strays[:3]}); delete those "
                           "shard folders and score them again")
    ranked = sorted((sample_rank(path, sha256_of[path]), n, row) for n, (paths, _) in enumerate(samples)
                    for row, path in enumerate(paths))[:rows]
    if not ranked:
        return np.zeros((0, 0), np.float32)
    return np.stack([samples[n][1][row] for _, n, row in ranked]).astype(np.float32)


def batch_embedding_shift(reference: np.ndarray | None, batch: np.ndarray | None, unavailable: str = "",
                          seed: int = 0) -> dict:
    """Whether the batch's embeddings look unlike the training sample's, with the numbers and the rule.

    A domain classifier (tasks.data_changes.embedding_shift) tries to tell the
    version's reference sample of training embeddings from the batch's sample; its
    cross-validated AUC is compared with the noise band the same classifier
    reaches on randomly relabelled rows. Shifted when the AUC is above the band
    and above EMBEDDING_AUC_THRESHOLD. `unavailable` says why there is nothing to
    compare (an older version, an engine without embeddings).
    """
    from tasks.data_changes import MIN_DOMAIN_IMAGES, embedding_shift

    rule = (f"shifted when a domain classifier's cross-validated AUC (training sample vs batch sample) is above "
            f"the noise band it reaches on randomly relabelled rows and above {EMBEDDING_AUC_THRESHOLD}")
    base = {"rule": rule, "threshold": EMBEDDING_AUC_THRESHOLD}
    if unavailable or reference is None or batch is None:
        return {**base, "status": "unavailable", "shifted": None, "auc": None,
                "reason": unavailable or "no embeddings to compare"}
    if min(len(reference), len(batch)) < MIN_DOMAIN_IMAGES:
        return {**base, "status": "unavailable", "shifted": None, "auc": None, "n_reference": len(reference),
                "n_batch": len(batch), "reason": f"fewer than {MIN_DOMAIN_IMAGES} images on a side"}
    if reference.shape[1] != batch.shape[1]:
        return {**base, "status": "unavailable", "shifted": None, "auc": None,
                "reason": f"the reference sample has {reference.shape[1]}-d embeddings, the batch {batch.shape[1]}-d"}
    measured = embedding_shift(reference, batch, seed)
    shifted = bool(measured["shifted"] and measured["auc"] > EMBEDDING_AUC_THRESHOLD)
    band = measured["noise_band"]
    if shifted:
        verdict = (f"the batch looks unlike the model's training data: a classifier tells its embeddings from the "
                   f"training sample's with AUC {measured['auc']:.3f}, above the noise band "
                   f"[{band[0]:.3f}, {band[1]:.3f}] and the threshold {EMBEDDING_AUC_THRESHOLD}; check its "
                   "predictions before acting on them")
    else:
        why = (f"not above the noise band [{band[0]:.3f}, {band[1]:.3f}]" if not measured["shifted"] else
               f"above the noise band [{band[0]:.3f}, {band[1]:.3f}] but not above the threshold "
               f"{EMBEDDING_AUC_THRESHOLD}")
        verdict = (f"the batch's embeddings look like the training sample's: AUC {measured['auc']:.3f}, {why}")
    return {**base, "status": "shifted" if shifted else "not shifted", "shifted": shifted, "auc": measured["auc"],
            "noise_band": band, "beyond_noise": measured["shifted"], "n_reference": len(reference),
            "n_batch": len(batch), "classifier": measured["classifier"], "verdict": verdict}


def read_predictions(uri: str):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))


# ---------------------------------------------------------------- summary

def summarize(table, classes: tuple[str, ...], unreadable: list[dict], test_confidences: np.ndarray | None,
              test_source: str, embedding: dict | None = None) -> dict:
    """Counts per predicted class, the confidence histogram, the shift against the test set and the embedding
    shift (`batch_embedding_shift`'s answer)."""
    confidence = table["probability_1"].to_numpy(dtype=np.float64) if len(table) else np.zeros(0)
    counts = table["label_1"].value_counts() if len(table) else {}
    histogram, edges = np.histogram(confidence, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return {
        "n_scored": len(table),
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "counts": {name: int(counts.get(name, 0)) for name in classes},
        "confidence": {"mean": float(confidence.mean()) if len(confidence) else None,
                       "histogram": {"edges": [round(float(edge), 4) for edge in edges],
                                     "counts": [int(count) for count in histogram]}},
        "shift": confidence_shift(confidence, test_confidences, test_source),
        "embedding_shift": embedding or batch_embedding_shift(None, None, "not measured"),
    }


def confidence_shift(batch: np.ndarray, test: np.ndarray | None, test_source: str) -> dict:
    """Whether the batch's top-1 confidences look unlike the test set's, with the numbers and the rule.

    Shifted when the two-sample Kolmogorov-Smirnov distance D exceeds both its
    critical value at alpha = 0.01 (1.628 * sqrt((n + m) / (n m))) and 0.1. A batch
    the model is much less sure of than of its test images is often not like the
    training data: other kinds of images, other cameras, classes it never saw.
    """
    rule = (f"shifted when the Kolmogorov-Smirnov distance D between the batch's and the test set's top-1 "
            f"confidences exceeds both its critical value at alpha = 0.01 and {KS_MIN_DISTANCE}")
    if test is None or not len(test) or not len(batch):
        reason = "no test-set confidences in the published version" if test is None or not len(test) else \
            "no image was scored"
        return {"status": "unknown", "shifted": None, "rule": rule, "reason": reason, "test_source": test_source}
    n, m = len(batch), len(test)
    values = np.sort(np.concatenate([batch, test]))
    distance = float(np.max(np.abs(np.searchsorted(np.sort(batch), values, side="right") / n
                                   - np.searchsorted(np.sort(test), values, side="right") / m)))
    critical = KS_ALPHA_COEFFICIENT * float(np.sqrt((n + m) / (n * m)))
    shifted = distance > critical and distance > KS_MIN_DISTANCE
    verdict = ("the batch looks unlike the model's test data: check a sample of its least confident predictions"
               if shifted else "the batch's confidences look like the model's test data")
    return {"status": "shifted" if shifted else "not shifted", "shifted": shifted, "rule": rule,
            "ks_distance": round(distance, 4), "critical_value": round(critical, 4),
            "batch_mean_confidence": round(float(batch.mean()), 4),
            "test_mean_confidence": round(float(test.mean()), 4), "n_batch": n, "n_test": m,
            "verdict": verdict, "test_source": test_source}


def test_confidences(version_uri: str) -> np.ndarray | None:
    """The top-1 confidences the model gave its own test images (from its published report), if it has them."""
    import pandas as pd

    uri = storage.join(version_uri, TEST_PREDICTIONS)
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except StorageError:
        return None
    return table["predicted_probability"].to_numpy(dtype=np.float64) if "predicted_probability" in table else None


def least_confident(table, count: int):
    """The `count` predictions the model was least sure of, least sure first (ties by path)."""
    return table.sort_values(["probability_1", "path"], kind="stable").head(count)


def thumbnail(data: bytes) -> str:
    """A PNG data: URI of an image, at most THUMBNAIL_PX on a side, decoded by the project's decoder."""
    from PIL import Image

    pixels = images.to_rgb(data, max_pixels=settings.load().limits.max_image_pixels)
    picture = Image.fromarray(pixels)
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_page(rows, thumbnails: list[str], summary: dict, title: str) -> str:
    """The least confident predictions with their top-k, above the run's counts and shift: one HTML page with
    its thumbnails inline (the plugin serves it under a no-script Content-Security-Policy)."""
    e = html.escape
    k = sum(1 for column in rows.columns if column.startswith("label_"))
    figures = []
    for (_, row), src in zip(rows.iterrows(), thumbnails, strict=False):
        labels = "".join(f"<li>{e(str(row[f'label_{i}']))} {row[f'probability_{i}']:.3f}</li>"
                         for i in range(1, k + 1))
        image = f"<img src='{src}' alt=''>" if src else "<div class='missing'>no preview</div>"
        figures.append(f"<figure>{image}<figcaption><code>{e(str(row['path']))}</code><ol>{labels}</ol>"
                       "</figcaption></figure>")
    shift = summary["shift"]
    shift_text = e(shift.get("verdict") or shift.get("reason", ""))
    if shift.get("ks_distance") is not None:
        shift_text += (f" (KS distance {shift['ks_distance']} vs critical {shift['critical_value']}; mean "
                       f"confidence {shift['batch_mean_confidence']} vs {shift['test_mean_confidence']} on the test "
                       "set)")
    embedding = summary.get("embedding_shift") or {}
    embedding_text = e(embedding.get("verdict") or f"not measured ({embedding.get('reason', 'no record')})")
    counts = "".join(f"<tr><td>{e(name)}</td><td>{count}</td></tr>" for name, count in summary["counts"].items())
    unreadable = "".join(f"<li><code>{e(item['path'])}</code>: {e(item['reason'])}</li>"
                         for item in summary["unreadable"]) or "<li>none</li>"
    style = ("body{font:14px/1.4 system-ui,sans-serif;margin:20px}.grid{display:flex;flex-wrap:wrap;gap:12px}"
             "figure{width:180px;margin:0;border:1px solid #ddd;padding:6px}img{max-width:168px}"
             "ol{margin:4px 0;padding-left:18px}code{word-break:break-all}.missing{height:96px;color:#888}"
             "table{border-collapse:collapse}td{border-bottom:1px solid #eee;padding:2px 10px}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body><h1>{e(title)}</h1>"
            f"<p>{summary['n_scored']} images scored, {summary['n_unreadable']} unreadable. Shift: {shift_text}.</p>"
            f"<p>Embedding shift: {embedding_text}.</p>"
            f"<h2>Least confident predictions</h2><div class='grid'>{''.join(figures) or 'none'}</div>"
            f"<h2>Predicted classes</h2><table>{counts}</table><h2>Unreadable files</h2><ul>{unreadable}</ul>"
            "</body></html>")


# ---------------------------------------------------------------- archives

def _extracted(source: str, cache_dir: str) -> Path:
    """The archive extracted into this worker's cache (once; a second worker extracts its own copy)."""
    from tasks.datasets import download, extract_archive

    entry = Path(cache_dir) / "batch-sources" / hashlib.sha256(source.encode()).hexdigest()[:24]
    if (entry / "images").is_dir():
        return entry / "images"
    with scratch_dir("batch-source", entry.parent) as work:
        archive = work / PurePosixPath(urlparse(source).path).name
        if urlparse(source).scheme in ("http", "https"):
            download(source, archive)
        else:
            storage.download(source, archive)
        extract_archive(archive, work / "images")
        entry.mkdir(parents=True, exist_ok=True)
        try:
            (work / "images").rename(entry / "images")
        except OSError:
            if not (entry / "images").is_dir():
                raise
    log.info("extracted %s into %s", redact_uri(source), entry / "images")
    return entry / "images"


def worker_pool() -> ThreadPoolExecutor:
    """Threads that read and hash a shard's files (for its key) or the gallery's images: I/O and hashing, which
    release the GIL; decoding for the model happens in its lanes (`score`)."""
    return ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))


def shard_prefix(output_root: str, key: str) -> str:
    return storage.join(output_root, "shards", key)
