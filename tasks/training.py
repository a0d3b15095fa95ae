"""What both training phases (feature extraction, fine-tuning) share.

The distribution strategy, the split files a phase reads from the run root,
the epoch-keyed data pipelines (the same epoch always sees the same order, so a
resumed run repeats an uninterrupted one), compile settings, and the
fingerprint that ties a checkpoint to its settings. The phase names and what a
phase records live in tasks/phases.py (no TensorFlow there).
"""
from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from tasks import activation_cache, artifacts, feature_store, settings, storage
from tasks.activation_cache import CachedSplit
from tasks.backbones import Backbone, make_optimizer
from tasks.checkpoints import KerasEpochs
from tasks.config import RunConfig
from tasks.errors import TrainingError
from tasks.records import image_dataset

log = logging.getLogger(__name__)

TRAINING_SPLITS = ("train", "val")
# Steps per call into TensorFlow in Keras' fit: a call defers Python's signal handlers (Airflow's SIGTERM) until it
# returns, so heavy steps (a backbone, a fine-tuned top) run 32 at most (a head on features: tasks/head_training.py).
MAX_STEPS_PER_EXECUTION = 32


@dataclass(frozen=True)
class Feed:
    """How a phase's batches are made: image size, batch size, the seed that orders each epoch, the label shape."""

    image_size: int
    batch_size: int
    seed: int
    num_classes: int
    one_hot: bool  # the loss wants one-hot labels (any loss but the sparse_ ones)

    @classmethod
    def of(cls, cfg: RunConfig, num_classes: int) -> Feed:
        return cls(cfg.image_size, cfg.batch_size, cfg.seed, num_classes, not cfg.loss.startswith("sparse_"))

    def epoch_seed(self, epoch: int) -> int:
        """The shuffle seed of one epoch: the same epoch gets the same order in a resumed run."""
        return self.seed * 100_003 + epoch

    def targets(self) -> Callable:
        """A tf.data map that shapes labels for the loss: integers for sparse losses, one-hot for the others."""
        import tensorflow as tf

        if not self.one_hot:
            return lambda x, y: (x, y)
        return lambda x, y: (x, tf.one_hot(y, self.num_classes))

    def batches(self, count: int) -> int:
        return math.ceil(count / self.batch_size)


def strategy_for(gpus: list[str]):
    """MirroredStrategy over the given GPUs when there are several, else TensorFlow's default strategy."""
    import tensorflow as tf

    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(gpus)
    return tf.distribute.get_strategy()


def distribution_strategy():
    """The strategy for this machine: data-parallel over all visible GPUs, or the plain default."""
    import tensorflow as tf

    return strategy_for([device.name for device in tf.config.list_logical_devices("GPU")])


def fingerprint(cfg: RunConfig, backbone: Backbone, manifest: dict[str, Any], phase: str,
                **extra: Any) -> dict[str, Any]:
    """The settings a phase's checkpoint depends on; a checkpoint with another fingerprint is not resumed.

    Epoch counts and early-stopping rules are left out on purpose: raising
    `epochs` on a finished run continues it instead of starting over.
    """
    return {"phase": phase, "data": manifest["sha256"], "backbone": cfg.backbone, "weights": backbone.weights_source,
            "image_size": cfg.image_size, "batch_size": cfg.batch_size, "dropout": cfg.dropout,
            "optimizer": cfg.optimizer, "learning_rate": cfg.learning_rate, "loss": cfg.loss, "augment": cfg.augment,
            "seed": cfg.seed, **extra}


def stage_records(cfg: RunConfig, scratch: Path, splits: tuple[str, ...] = TRAINING_SPLITS) -> dict[str, Path]:
    """Local copies of the splits' TFRecord files (TensorFlow reads local files), from the run root."""
    uris = artifacts.require(cfg, *(artifacts.split_records(split) for split in splits))
    return {split: storage.download(uri, scratch / "data" / f"{split}.tfrecord")
            for split, uri in zip(splits, uris, strict=True)}


def count_records(path: Path) -> int:
    import tensorflow as tf

    def add_one(count, _record):
        return count + 1

    return int(tf.data.TFRecordDataset(str(path)).reduce(np.int64(0), add_one))


def image_data(feed: Feed, records: dict[str, Path]) -> KerasEpochs:
    """Training on images (augmented feature extraction, fine-tuning): the train split's epochs, their
    batch count, and the validation batches."""
    train_epoch, steps = image_epochs(feed, records["train"])
    return KerasEpochs(train_epoch, steps, validation_images(feed, records["val"]))


def image_epochs(feed: Feed, records: Path) -> tuple[Callable, int]:
    """(epoch -> that epoch's shuffled image batches, batches per epoch) for one split file."""
    def image_epoch(epoch: int):
        return image_dataset(records, feed.image_size, feed.batch_size,
                             shuffle_seed=feed.epoch_seed(epoch)).map(feed.targets())

    return image_epoch, feed.batches(count_records(records))


def validation_images(feed: Feed, records: Path):
    """The validation split in file order, with its batch count declared (Keras then never runs past its end)."""
    import tensorflow as tf

    return (image_dataset(records, feed.image_size, feed.batch_size).map(feed.targets())
            .apply(tf.data.experimental.assert_cardinality(feed.batches(count_records(records)))))


def cached_splits(bottom: keras.Model, key: dict[str, Any], uri: str, scratch: Path,
                  stage: Callable[[], dict[str, Path]], batch_size: int, beside: Executor | None = None,
                  companion: tuple[dict[str, Any], str] | None = None) -> dict[str, CachedSplit]:
    """What a frozen `bottom` makes of each train and val image (features, or fine-tuning's boundary activations).

    The bottom runs once per image and its activations live under the run root at
    `uri` (a retry on any worker reuses them; another `key` recomputes them);
    `stage` gives the local split files when they must be computed. Images new to
    the shared feature store are added to it on `beside` when given (see
    activation_cache.cache_activations; `scratch` must outlive it). With a
    `companion` (key, uri), `bottom` has a second output, cached at that uri when
    the pass computes every image (activation_cache.Companion). Returns the
    splits memory-mapped (tasks/activation_cache.py).
    """
    cached = open_cached(uri, key, scratch)
    if cached is not None:
        log.info("reused activations of %s under %s", ", ".join(TRAINING_SPLITS), uri)
        return cached
    local = _local(uri, scratch)
    alongside = None if companion is None else activation_cache.Companion(_local(companion[1], scratch), companion[0])
    cached = activation_cache.cache_activations(bottom, stage(), local, key, batch_size,
                                                feature_store.FeatureStore(*settings.load().feature_store_args()),
                                                beside, alongside)
    uploads = [(local, uri)] if alongside is None else [(local, uri), (alongside.directory, companion[1])]
    for folder, target in uploads:
        if storage.is_s3(target) and (folder / activation_cache.META).is_file():  # a companion may not be written
            storage.delete(target.rstrip("/") + "/")
            storage.upload(folder, target)
    return cached


def open_cached(uri: str, key: dict[str, Any], scratch: Path) -> dict[str, CachedSplit] | None:
    """The train and val splits cached at `uri` (local or s3://) under `key`; None when there are none, or when
    they were made under another key."""
    local = _local(uri, scratch)
    if not storage.is_s3(uri):
        return activation_cache.open_cache(local, key, list(TRAINING_SPLITS))
    if not storage.exists(storage.join(uri, activation_cache.META)):
        return None
    return activation_cache.open_cache(storage.download(uri.rstrip("/") + "/", local), key, list(TRAINING_SPLITS))


def _local(uri: str, scratch: Path) -> Path:
    """Where a cache at `uri` is read and written on this worker: the folder itself, or one in scratch for S3."""
    if storage.is_s3(uri):
        return scratch / "activations" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    return storage.local_path(uri)


def cached_epochs(feed: Feed, cached: dict[str, CachedSplit]) -> KerasEpochs:
    """Keras' epochs over cached splits: each epoch in the image pipeline's own order, streamed from disk in
    batches, and the validation batches."""
    shaped = feed.targets()
    return KerasEpochs(lambda epoch: cached["train"].batches(feed.batch_size, feed.epoch_seed(epoch)).map(shaped),
                       feed.batches(len(cached["train"])), cached["val"].batches(feed.batch_size).map(shaped))


def resolve_loss(name: str):
    """The configured Keras loss, checked before any work starts."""
    try:
        return keras.losses.get(name)
    except ValueError as error:
        raise TrainingError(f"loss={name!r} is not a Keras loss ({error}); "
                            "use e.g. 'sparse_categorical_crossentropy'") from error


def compile_model(model: keras.Model, optimizer: str, loss, learning_rate, backbone: Backbone,
                  steps_per_epoch: int = 1, most_steps: int = MAX_STEPS_PER_EXECUTION) -> None:
    """Compile with the configured loss and optimizer; accuracy is what early stopping and the decision watch.

    Given the epoch's batch count, up to `most_steps` steps run per call into TensorFlow (execution_steps).
    """
    model.compile(optimizer=make_optimizer(optimizer, learning_rate, backbone), loss=loss, metrics=["accuracy"],
                  steps_per_execution=execution_steps(steps_per_epoch, most_steps))


def execution_steps(steps_per_epoch: int, most: int) -> int:
    """The most training steps, up to `most`, that divide an epoch's batch count.

    Running steps in one call (Keras' steps_per_execution) saves Keras'
    per-call overhead of a few milliseconds a step, which matters where a step
    is light. An execution must end exactly at an epoch's end: one that crossed it
    would read the next epoch's first batches into this epoch (fit reads one
    stream of all epochs), so it is a divisor; the same batches in the same
    order, so the same weights.
    """
    return max(size for size in range(1, min(most, steps_per_epoch) + 1) if steps_per_epoch % size == 0)
