"""Frozen-bottom activations on disk: computed once per image, streamed back in each epoch's image order.

Whatever lies below the fine-tuning cut (tasks/backbone_split.py) maps an image
to the same activations every epoch, and for feature extraction the whole
backbone does. So one streaming pass computes them for every split and stores
them as raw float32 files, and each epoch reads them back in batches, memory
mapped: memory holds a batch and a shuffle buffer of record indices, however
many images there are.

The reader shuffles record indices with the image pipeline's own epoch order
(records.epoch_order), so an epoch on cached activations visits the images in
exactly the order, and batches, of the same epoch on images: training on the
cache is training on the images.

Layout of a cache directory: `<split>.f32` (activations, file order, raw
little-endian float32), `<split>-labels.npy`, and `meta.json` (the key of what
made them, and each split's count and shape), written last. A cache whose key
matches is reused (a retried task skips the pass); any other is recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import numpy as np

from tasks import feature_store, images
from tasks.backbone_split import Split
from tasks.backbones import Backbone
from tasks.errors import TrainingError
from tasks.feature_store import FeatureStore
from tasks.records import AHEAD, DECODERS, epoch_order, image_dataset, parsed_batches, steady

log = logging.getLogger(__name__)

META = "meta.json"
DTYPE = np.dtype("<f4")


@dataclass(frozen=True, eq=False)
class CachedSplit:
    """One split's activations (memory-mapped, file order) and labels."""

    activations: np.ndarray  # [n, *boundary shape], read-only memmap
    labels: np.ndarray  # [n] int64

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle_seed: int | None = None):
        """(activations, labels) batches as a tf.data.Dataset: file order, or one epoch's order for `shuffle_seed`.

        The order and batches are those of records.image_dataset(the split's file,
        ..., shuffle_seed=shuffle_seed); the batch count is declared.
        """
        import tensorflow as tf

        indices = tf.data.Dataset.range(len(self))
        if shuffle_seed is not None:
            indices = epoch_order(indices, shuffle_seed)
        shape = self.activations.shape[1:]

        def gather(batch):
            x, y = tf.numpy_function(self._rows, [batch], (tf.float32, tf.int64), stateful=False)
            x.set_shape((None, *shape))
            y.set_shape((None,))
            return x, y

        return steady(indices.batch(batch_size).map(gather, num_parallel_calls=DECODERS, deterministic=True)
                      .apply(tf.data.experimental.assert_cardinality(math.ceil(len(self) / batch_size)))
                      .prefetch(AHEAD))

    def order(self, shuffle_seed: int) -> np.ndarray:
        """The record indices in one epoch's order: that of batches(..., shuffle_seed), all at once."""
        import tensorflow as tf

        return next(iter(epoch_order(tf.data.Dataset.range(len(self)), shuffle_seed).batch(len(self)))).numpy()

    def _rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.activations[indices], dtype=np.float32), self.labels[indices]


def cache_key(backbone: Backbone, split: Split, data_hash: str) -> dict[str, Any]:
    """What the activations depend on: a cache with another key is recomputed.

    `weights` is a digest of the bottom's own weights, not where the backbone's came
    from: fine-tuning rebuilds the backbone and loads the weights feature extraction
    saved, and its key must equal the one feature extraction wrote its cache under.
    """
    return {"backbone": backbone.name, "weights": feature_store.weights_digest(split.bottom.get_weights()),
            "image_size": int(backbone.model.input_shape[1]), "cut": split.cut, "units": split.units,
            "data": data_hash, "decoder": images.DECODER_VERSION}


def store_key(key: dict[str, Any]) -> dict[str, Any]:
    """What one image's activations depend on, for the feature store shared by runs: the cache key (backbone,
    weights, image size, cut, decoder) without the data, plus the TensorFlow that runs the bottom."""
    import tensorflow as tf

    return {**{name: value for name, value in key.items() if name != "data"}, "tensorflow": tf.__version__}


@dataclass(frozen=True)
class Companion:
    """A second output of the same pass, cached in its own directory under its own key: feature extraction's pass
    also leaves fine-tuning's boundary activations, which it computes on the way to the features."""

    directory: Path
    key: dict[str, Any]


def cache_activations(bottom: keras.Model, records: dict[str, Path], directory: Path, key: dict[str, Any],
                      batch_size: int, store: FeatureStore | None = None, beside: Executor | None = None,
                      companion: Companion | None = None) -> dict[str, CachedSplit]:
    """Each split's bottom activations, from `directory` if its key matches, else computed there in one pass.

    `records` maps split names to their TFRecord files (records.write_records);
    `key` says what made the activations (cache_key). With a `store`, images it
    already holds (by content hash) are read from it and only the others go
    through the bottom; those are added to the store after the pass, from the
    files just written: on `beside` when given, overlapping whatever the caller
    does next (the caller waits for it when it shuts the executor down, and
    keeps `directory` until then), else before returning. Writing 6,000 entries
    beside the pass had slowed the backbone by 1-2 s on two cores.

    With a `companion`, `bottom` has two outputs, these activations and the
    companion's; the companion's are cached (and stored) too when the pass ran
    every image through the bottom, and left out when the store gave some: their
    companion outputs were never computed, and whoever needs them computes them.
    """
    started = time.monotonic()
    cached = open_cache(directory, key, list(records))
    if cached is not None:
        log.info("reused activations %s of %s in %s", _shape(cached), _counts(cached), directory)
        return cached
    (directory / META).unlink(missing_ok=True)  # a crash below must not leave a valid-looking cache
    directory.mkdir(parents=True, exist_ok=True)
    if companion is not None:
        (companion.directory / META).unlink(missing_ok=True)
        companion.directory.mkdir(parents=True, exist_ok=True)
    image_size = int(bottom.input_shape[1])
    run = _traced(bottom, image_size)
    space = _space(store, key)
    written = {name: _write_split(run, path, image_size, batch_size, directory, store, space, name,
                                  companion=companion.directory if companion else None)
               for name, path in records.items()}
    cached = _finish(directory, key, {name: split for name, (split, _) in written.items()})
    log.info("cached activations %s of %s in %.1f s -> %s (%.0f MB; %d images through the backbone)",
             _shape(cached), _counts(cached), time.monotonic() - started, directory,
             sum(split.activations.nbytes for split in cached.values()) / 1e6,
             sum(split["computed"] for split, _ in written.values()))
    fills = [(space, cached, written)]
    if companion is not None and all(split["computed"] == split["count"] for split, _ in written.values()):
        beside_cached = _finish(companion.directory, companion.key,
                                {name: {**split, "shape": split["companion_shape"]} for name, (split, _) in
                                 written.items()})
        log.info("cached activations %s of %s beside them -> %s", _shape(beside_cached), _counts(beside_cached),
                 companion.directory)
        fills.append((_space(store, companion.key), beside_cached, written))
    elif companion is not None:  # the store gave some images: nothing of the companion's is left to find
        shutil.rmtree(companion.directory, ignore_errors=True)
    if store is not None:
        for into, splits, new in fills:
            entries = [(sha, splits[name].activations[index]) for name, (_, pairs) in new.items()
                       for sha, index in pairs]
            if beside is None:
                feature_store.fill(store, into, entries)
            else:
                beside.submit(feature_store.fill, store, into, entries)
    return cached


def _space(store: FeatureStore | None, key: dict[str, Any]) -> str | None:
    """The store's namespace for activations made under `key` (described in the store), None without a store."""
    if store is None:
        return None
    space_key = store_key(key)
    space = feature_store.namespace(space_key)
    store.describe(space, space_key)
    return space


def _finish(directory: Path, key: dict[str, Any], splits: dict[str, dict[str, Any]]) -> dict[str, CachedSplit]:
    """Write `directory`'s meta.json last, which makes the split files written before it a cache; open it."""
    meta = {"key": key, "splits": {name: {field: split[field] for field in ("count", "shape", "computed")}
                                   for name, split in splits.items()}}
    temporary = directory / f".{META}.tmp"
    temporary.write_text(json.dumps(meta, indent=1))
    temporary.replace(directory / META)
    return open_cache(directory, key, list(splits))


def open_cache(directory: Path, key: dict[str, Any], splits: list[str]) -> dict[str, CachedSplit] | None:
    """The cached splits if `directory` holds them for `key`, else None."""
    meta_path = directory / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key or not set(splits) <= set(meta["splits"]):
        return None
    opened = {}
    for name in splits:
        count, shape = meta["splits"][name]["count"], tuple(meta["splits"][name]["shape"])
        data = directory / f"{name}.f32"
        if not data.is_file() or data.stat().st_size != count * math.prod(shape) * DTYPE.itemsize:
            return None
        opened[name] = CachedSplit(np.memmap(data, dtype=DTYPE, mode="r", shape=(count, *shape)),
                                   np.load(directory / f"{name}-labels.npy"))
    return opened


def _traced(bottom: keras.Model, image_size: int) -> Callable:
    """The bottom as one traced function for every split (eager calls are ~2x slower), its outputs as a tuple."""
    import tensorflow as tf

    def forward(images):
        outputs = bottom(images, training=False)
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

    return tf.function(forward, input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])


def _write_split(run: Callable, records: Path, image_size: int, batch_size: int, directory: Path,
                 store: FeatureStore | None, space: str | None, name: str, companion: Path | None = None
                 ) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Stream one split through the bottom into `<name>.f32` and `<name>-labels.npy`; returns its count, shape and
    how many images the bottom computed (the others came from the store), and with a store (sha256, index) of
    each image computed: what the store lacks. With a `companion` directory, the bottom's second output goes there
    in the same files (complete, in file order, only when every image was computed; the caller checks)."""
    labels, shape, new = [], None, []
    temporary = directory / f".{name}.f32.tmp"
    beside = companion / f".{name}.f32.tmp" if companion else None
    computed, companion_shape = 0, None
    with open(temporary, "wb") as out, contextlib.ExitStack() as files:
        side = files.enter_context(open(beside, "wb")) if beside else None

        def outputs(images) -> np.ndarray:
            """The bottom's first output for a batch; its second, with a companion, appended to the companion's file."""
            nonlocal companion_shape
            first, *second = run(images)
            if side is not None:
                batch = np.asarray(second[0], dtype=DTYPE)
                companion_shape = list(batch.shape[1:])
                side.write(batch.tobytes())
            return np.asarray(first, dtype=DTYPE)

        if store is None:
            for images, batch_labels in image_dataset(records, image_size, batch_size):
                activations = outputs(images)
                shape = activations.shape[1:]
                out.write(activations.tobytes())
                labels.append(batch_labels.numpy())
            computed = sum(len(batch) for batch in labels)
        else:
            hashes, split_labels = _hashes_and_labels(records)
            labels = [np.asarray(split_labels, dtype=np.int64)] if split_labels else []
            extracted = feature_store.extract(
                store, space, hashes, lambda indices: _computed(outputs, records, indices, len(hashes), image_size,
                                                                batch_size))
            for activations in extracted.features:
                shape = activations.shape
                out.write(np.asarray(activations, dtype=DTYPE).tobytes())
            new = [(hashes[index], index) for index in sorted(extracted.computed)]
            computed = len(new)
    if shape is None:
        temporary.unlink()
        if beside:
            beside.unlink()
        raise TrainingError(f"{records}: no images in the {name} split; rerun subsample so every split has images")
    count = int(sum(len(batch) for batch in labels))
    all_labels = np.concatenate(labels).astype(np.int64)
    np.save(directory / f"{name}-labels.npy", all_labels)
    temporary.replace(directory / f"{name}.f32")
    if beside and computed == count:
        np.save(companion / f"{name}-labels.npy", all_labels)
        beside.replace(companion / f"{name}.f32")
    elif beside:
        beside.unlink()
    return {"count": count, "shape": list(shape), "computed": computed, "companion_shape": companion_shape}, new


def _hashes_and_labels(records: Path) -> tuple[list[str], list[int]]:
    """Each record's original file sha256 (the manifest's content hash) and label, in file order."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string), "original": tf.io.FixedLenFeature([], tf.string, b""),
            "label": tf.io.FixedLenFeature([], tf.int64)}
    hashes, labels = [], []
    for batch in parsed_batches(records, spec):
        for image, original in zip(batch["image"], batch["original"], strict=True):
            hashes.append(hashlib.sha256(original or image).hexdigest())  # an original already canonical: the image
        labels.extend(int(label) for label in batch["label"])
    return hashes, labels


def _computed(run: Callable[..., np.ndarray], records: Path, indices: list[int], count: int, image_size: int,
              batch_size: int) -> Iterator[np.ndarray]:
    """The bottom's activations (`run` of a batch) of the records at `indices` (ascending), one array per image,
    streamed in batches."""
    if not indices:
        return
    only = indices if len(indices) < count else None
    for batch, _ in image_dataset(records, image_size, batch_size, only=only):
        yield from run(batch)


def _shape(cached: dict[str, CachedSplit]) -> tuple[int, ...]:
    return next(iter(cached.values())).activations.shape[1:]


def _counts(cached: dict[str, CachedSplit]) -> str:
    return " + ".join(f"{len(split)} {name}" for name, split in cached.items())
