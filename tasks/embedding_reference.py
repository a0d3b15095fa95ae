"""A published version's reference sample of training embeddings, for the embedding shift of scored batches.

At publish, up to MAX_ROWS training images (a seeded sample of the train split,
chosen before any is decoded) go through the published classifier's embeddings
function (tasks.serving_export.with_embeddings: the head's dense-layer input, the
same outputs the scoring model gives), and are stored in the version as
`reference/embeddings.npy` (float16) beside `reference/embeddings.json` (what was
sampled). Both are in the version's checksums.json, so a scorer verifies them like
the model files. The embeddings come from the published model itself rather than
from the run's activation cache: after fine-tuning the cached (frozen-bottom)
features are not what the published model computes, and with augmentation on
there is no cache; a bounded sample costs one forward pass of MAX_ROWS images.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

FILE = "reference/embeddings.npy"
META_FILE = "reference/embeddings.json"
MAX_ROWS = 1000
DTYPE = np.float16  # half the bytes; the domain classifier standardises and projects, far coarser than float16
SPLIT = "train"
BATCH = 64


def sample_indices(count: int, seed: int, rows: int = MAX_ROWS) -> np.ndarray:
    """Which of `count` records (file order) form the sample: seeded, sorted, at most `rows`."""
    return np.sort(np.random.default_rng(seed).choice(count, size=min(count, rows), replace=False))


def write(model, train_records: Path, stage: Path, seed: int) -> dict:
    """Embed a sample of the train split with `model` (the published Keras classifier) into the version at
    `stage`; returns what embeddings.json says. The sample's canonical images are decoded by tf.data, in
    parallel and a batch at a time, as training reads them."""
    from tasks.records import image_dataset
    from tasks.training import count_records

    count = count_records(train_records)  # a batched count: no record parsed twice
    size = int(model.input_shape[1])
    pixels = (images for images, _ in image_dataset(train_records, size, BATCH, only=sample_indices(count, seed)))
    return _store(_embed(model, pixels), stage, {"split": SPLIT, "n_records": count, "seed": seed})


def write_sample(model, encoded: Iterable[bytes], stage: Path, meta: dict) -> dict:
    """Embed these encoded images (decoded by the project's decoder, a batch at a time) and store them, with
    `meta` and the sample's shape, under `stage`."""
    from tasks import images

    size = int(model.input_shape[1])
    encoded = iter(encoded)
    batches = (np.stack([images.decode(data, size) for data in batch])
               for batch in iter(lambda: list(itertools.islice(encoded, BATCH)), []))
    return _store(_embed(model, batches), stage, meta)


def _embed(model, pixels: Iterable) -> np.ndarray:
    """The embeddings of each batch of pixels, stacked in DTYPE."""
    import tensorflow as tf

    from tasks.serving_export import with_embeddings

    size = int(model.input_shape[1])
    # eager layer calls take ~5x as long; the fixed signature traces once, the short last batch included
    embed = tf.function(with_embeddings(model), input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
    rows = [np.asarray(embed(batch)["embeddings"]) for batch in pixels]
    return np.concatenate(rows).astype(DTYPE) if rows else np.zeros((0, 0), DTYPE)


def _store(embeddings: np.ndarray, stage: Path, meta: dict) -> dict:
    """Write the sample and its embeddings.json (`meta` with the sample's shape) under `stage`; returns the
    latter."""
    meta = {**meta, "n_rows": len(embeddings), "embedding_size": int(embeddings.shape[1]),
            "dtype": np.dtype(DTYPE).name,
            "source": "the published classifier's serve_embeddings outputs (the head's dense-layer input)"}
    (stage / FILE).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, embeddings, allow_pickle=False)
    (stage / FILE).write_bytes(buffer.getvalue())
    (stage / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def load(path: Path) -> np.ndarray:
    """The reference sample as float32 rows (no pickles: a version's files are input, not code)."""
    return np.load(path, allow_pickle=False).astype(np.float32)


def publish(cfg, model, stage: Path) -> dict:
    """`write` for a run being published (tasks/steps/publish_version.py): its train split from the run root,
    the sample seeded with the run's seed."""
    from tasks import artifacts, storage

    (uri,) = artifacts.require(cfg, artifacts.split_records(SPLIT))
    records = storage.download(uri, stage.parent / f"reference-{SPLIT}.tfrecord")
    started = time.monotonic()
    try:
        meta = write(model, records, stage, cfg.seed)
    finally:
        records.unlink(missing_ok=True)
    log.info("publish: reference sample of %d training embeddings (%d-d, %s) in %.1f s", meta["n_rows"],
             meta["embedding_size"], meta["dtype"], time.monotonic() - started)
    return meta
