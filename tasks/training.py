"""What both training phases (feature extraction, fine-tuning) share.

The phase names, the distribution strategy, the manifest and split files a
phase reads from the run root, the epoch-keyed data pipelines (the same epoch
always sees the same order, so a resumed run repeats an uninterrupted one),
compile settings, and the fingerprint that ties a checkpoint to its settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from tasks import activation_cache, artifacts, feature_store, settings, storage
from tasks.backbones import Backbone, make_optimizer
from tasks.config import RunConfig
from tasks.errors import TrainingError
from tasks.records import image_dataset

log = logging.getLogger(__name__)

FEATURE_EXTRACTION = "feature_extraction"
FINE_TUNE = "fine_tune"
PHASES = (FEATURE_EXTRACTION, FINE_TUNE)
TRAINING_SPLITS = ("train", "val")


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


def read_manifest(cfg: RunConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The manifest subsample handed over (`data`), plus its sha256: checkpoints and caches hold only for it.

    A manifest whose selection hash differs from the one subsample returned was
    rewritten since (another subsample of this run): the phase refuses it.
    """
    (uri,) = artifacts.require(cfg, artifacts.MANIFEST)
    raw = storage.read_bytes(uri)
    manifest = json.loads(raw)
    if data.get("hash") not in (None, manifest.get("hash")):
        raise TrainingError(f"{uri} holds selection {manifest.get('hash')!r}, but subsample handed over "
                            f"{data['hash']!r}; re-run subsample and the steps after it for run {cfg.run_id!r}")
    if not manifest.get("classes"):
        raise TrainingError(f"{uri} lists no classes; rerun subsample with at least two classes")
    return {**manifest, "sha256": hashlib.sha256(raw).hexdigest()}


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


def stage_records(cfg: RunConfig, split: str, scratch: Path) -> Path:
    """A local copy of one split's TFRecord file (TensorFlow reads local files)."""
    (uri,) = artifacts.require(cfg, artifacts.split_records(split))
    return storage.download(uri, scratch / "data" / f"{split}.tfrecord")


def count_records(path: Path) -> int:
    import tensorflow as tf

    def add_one(count, _record):
        return count + 1

    return int(tf.data.TFRecordDataset(str(path)).reduce(np.int64(0), add_one))


def targets(cfg: RunConfig, num_classes: int) -> Callable:
    """A tf.data map that shapes labels for the loss: integers for sparse losses, one-hot for the others."""
    import tensorflow as tf

    if cfg.loss.startswith("sparse_"):
        return lambda x, y: (x, y)
    return lambda x, y: (x, tf.one_hot(y, num_classes))


def epoch_seed(cfg: RunConfig, epoch: int) -> int:
    """The shuffle seed of one epoch: the same epoch gets the same order in a resumed run."""
    return cfg.seed * 100_003 + epoch


def image_data(cfg: RunConfig, scratch: Path, num_classes: int) -> tuple[Callable, int, Any]:
    """Training on images (augmented feature extraction, fine-tuning): the train split's epochs, their
    batch count, and the validation batches, staged in from the run root."""
    train_path, val_path = (stage_records(cfg, split, scratch) for split in TRAINING_SPLITS)
    train_epoch, steps = image_epochs(cfg, train_path, num_classes)
    return train_epoch, steps, validation_images(cfg, val_path, num_classes)


def image_epochs(cfg: RunConfig, records: Path, num_classes: int) -> tuple[Callable, int]:
    """(epoch -> that epoch's shuffled image batches, batches per epoch) for one split file."""
    def image_epoch(epoch: int):
        return image_dataset(records, cfg.image_size, cfg.batch_size,
                             shuffle_seed=epoch_seed(cfg, epoch)).map(targets(cfg, num_classes))

    return image_epoch, math.ceil(count_records(records) / cfg.batch_size)


def validation_images(cfg: RunConfig, records: Path, num_classes: int):
    """The validation split in file order, with its batch count declared (Keras then never runs past its end)."""
    import tensorflow as tf

    batches = math.ceil(count_records(records) / cfg.batch_size)
    return (image_dataset(records, cfg.image_size, cfg.batch_size).map(targets(cfg, num_classes))
            .apply(tf.data.experimental.assert_cardinality(batches)))


def cached_data(cfg: RunConfig, bottom: keras.Model, key: dict[str, Any], uri: str, scratch: Path,
                num_classes: int) -> tuple[Callable, int, Any]:
    """Training on what a frozen `bottom` makes of each image (features, or fine-tuning's boundary activations).

    The bottom runs once per train/val image and its activations live under the
    run root at `uri` (a retry on any worker reuses them; another `key` recomputes
    them). Returns the epochs fit_resumable reads — each epoch in the image
    pipeline's own order, streamed from disk in batches — their batch count, and
    the validation batches.
    """
    local = scratch / "activations" if storage.is_s3(uri) else storage.local_path(uri)
    cached = None
    if storage.is_s3(uri) and storage.exists(storage.join(uri, activation_cache.META)):
        cached = activation_cache.open_cache(storage.download(uri.rstrip("/") + "/", local), key,
                                              list(TRAINING_SPLITS))
    elif not storage.is_s3(uri):
        cached = activation_cache.open_cache(local, key, list(TRAINING_SPLITS))
    if cached is None:
        records = {split: stage_records(cfg, split, scratch) for split in TRAINING_SPLITS}
        cached = activation_cache.cache_activations(bottom, records, local, key, cfg.batch_size,
                                                    feature_store.FeatureStore(*settings.load().feature_store_args()))
        if storage.is_s3(uri):
            storage.delete(uri.rstrip("/") + "/")
            storage.upload(local, uri)
    else:
        log.info("reused activations of %s under %s", ", ".join(TRAINING_SPLITS), uri)
    train_epoch, steps = cached["train"].epochs(cfg.batch_size, lambda epoch: epoch_seed(cfg, epoch))
    shaped = targets(cfg, num_classes)
    return (lambda epoch: train_epoch(epoch).map(shaped)), steps, cached["val"].batches(cfg.batch_size).map(shaped)


def resolve_loss(cfg: RunConfig):
    """The configured Keras loss, checked before any work starts."""
    try:
        return keras.losses.get(cfg.loss)
    except ValueError as error:
        raise TrainingError(f"loss={cfg.loss!r} is not a Keras loss ({error}); "
                            "use e.g. 'sparse_categorical_crossentropy'") from error


def compile_model(model: keras.Model, cfg: RunConfig, loss, learning_rate: float, backbone: Backbone) -> None:
    """Compile with the configured loss and optimizer; accuracy is what early stopping and the decision watch."""
    model.compile(optimizer=make_optimizer(cfg.optimizer, learning_rate, backbone), loss=loss, metrics=["accuracy"])
