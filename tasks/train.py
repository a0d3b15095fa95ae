"""Step 3: feature extraction — train a new head on a frozen pretrained backbone.

Without augmentation the frozen backbone would compute the same features every
epoch, so it runs exactly once per image: train and validation features are
computed in one streaming pass, stored under the run root (a retry reuses
them), and the head trains on them in seconds. With augmentation every epoch
sees new images, so the backbone runs per epoch inside the model. Either way
the trained head is then composed with the backbone into one
image-in/probabilities-out model; that model (`model/feature_extraction.keras`)
is also the run's model until fine-tuning beats it.

Also home of what both training phases share: the distribution strategy, the
epoch-keyed data pipelines, compile settings, and the run-root bookkeeping.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from tasks import artifacts, storage
from tasks.backbones import Backbone, load_backbone, make_optimizer
from tasks.checkpoints import fit_resumable
from tasks.config import RunConfig
from tasks.errors import TrainingError
from tasks.head import augmentation, build_head, compose
from tasks.records import image_dataset

log = logging.getLogger(__name__)

PHASE = "feature_extraction"
FEATURE_SPLITS = ("train", "val")



def train(cfg: RunConfig) -> dict[str, Any]:
    """Train the head (resuming from the last checkpoint), save the composed model, write history and summary."""
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    loss = resolve_loss(cfg)
    manifest = read_manifest(cfg)
    num_classes = len(manifest["classes"])
    strategy = distribution_strategy()
    with tempfile.TemporaryDirectory(prefix="tlp-train-") as scratch_dir, strategy.scope():
        scratch = Path(scratch_dir)
        backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
        backbone.model.trainable = False
        head = build_head(tuple(backbone.model.output_shape[1:]), num_classes, cfg.dropout)
        if cfg.augment:
            model = compose(backbone, head, augmentation(cfg.seed))
            train_epoch, steps, validation = image_data(cfg, scratch, num_classes)
        else:
            model = head
            features = cached_features(cfg, backbone, manifest, scratch)
            train_epoch, steps = array_epochs(cfg, *features["train"], num_classes)
            validation = _array_dataset(*features["val"]).batch(cfg.batch_size).map(targets(cfg, num_classes))
        compile_model(model, cfg, loss, cfg.learning_rate, backbone)
        result = fit_resumable(model, cfg, phase=PHASE, first_epoch=0, last_epoch=cfg.epochs,
                               train_epoch=train_epoch, steps_per_epoch=steps, validation=validation,
                               fingerprint=fingerprint(cfg, backbone, manifest, PHASE), scratch=scratch)
        classifier = compose(backbone, head)
        save_model(classifier, scratch, cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL), cfg.artifact(artifacts.MODEL))
    seconds = round(time.monotonic() - started, 2)
    storage.write_json(cfg.artifact(artifacts.HISTORY), {"epochs": result.history, "fine_tune_start_epoch": None})
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY), {
        "backbone": backbone.name, "weights_source": backbone.weights_source, "feature_dim": backbone.feature_dim,
        "kept": PHASE,
        "phases": {PHASE: {**result.record(seconds), "augment": cfg.augment}},
        "val_accuracy": {PHASE: result.best_val_accuracy, "fine_tuned": None},
    })
    model_uri = cfg.artifact(artifacts.MODEL)
    log.info("feature extraction: %s in %.1f s -> %s", result.describe(), seconds, model_uri)
    return {"model_uri": model_uri, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy, "val_accuracy": result.best_val_accuracy,
            "stopped_early": result.stopped_early, "seconds": seconds,
            "resumed_from_epoch": result.resumed_from_epoch}


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


def read_manifest(cfg: RunConfig) -> dict[str, Any]:
    """The subsample manifest, plus its sha256 (checkpoints and cached features are only valid for that data)."""
    uri = cfg.artifact(artifacts.MANIFEST)
    if not storage.exists(uri):
        raise TrainingError(f"no manifest at {uri}; run the subsample step for run {cfg.run_id!r} first")
    data = storage.read_bytes(uri)
    manifest = json.loads(data)
    if not manifest.get("classes"):
        raise TrainingError(f"{uri} lists no classes; rerun subsample with at least two classes")
    return {**manifest, "sha256": hashlib.sha256(data).hexdigest()}


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
    uri = cfg.artifact(artifacts.split_records(split))
    if not storage.exists(uri):
        raise TrainingError(f"no {split} split at {uri}; run the subsample step for run {cfg.run_id!r} first")
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
    train_path, val_path = (stage_records(cfg, split, scratch) for split in FEATURE_SPLITS)
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


def array_epochs(cfg: RunConfig, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[Callable, int]:
    """(epoch -> that epoch's shuffled batches of cached features, batches per epoch)."""
    examples = _array_dataset(x, y)

    def feature_epoch(epoch: int):
        return examples.shuffle(len(x), seed=epoch_seed(cfg, epoch)).batch(cfg.batch_size).map(
            targets(cfg, num_classes))

    return feature_epoch, math.ceil(len(x) / cfg.batch_size)


def _array_dataset(x: np.ndarray, y: np.ndarray):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y))


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


def extract_features(backbone: Backbone, splits: list[Path], image_size: int,
                     batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(features [n, ...], labels [n]) of every image of each split file, in file order.

    One streaming pass: each image goes through the backbone once, all splits
    through one traced function.
    """
    import tensorflow as tf

    embed = tf.function(lambda images: backbone.model(images, training=False),
                        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    extracted = []
    for records in splits:
        features, labels = [], []
        for images, batch_labels in image_dataset(records, image_size, batch_size):
            features.append(embed(images).numpy())
            labels.append(batch_labels.numpy())
        if not features:
            raise TrainingError(f"{records}: no images; rerun subsample so every split has images")
        extracted.append((np.concatenate(features), np.concatenate(labels)))
    return extracted


def cached_features(cfg: RunConfig, backbone: Backbone, manifest: dict[str, Any],
                    scratch: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and validation features from the run root, computed (once) if missing or made by another backbone."""
    key = {"backbone": cfg.backbone, "weights": backbone.weights_source, "image_size": cfg.image_size,
           "data": manifest["sha256"]}
    meta_uri = cfg.artifact(artifacts.FEATURES, "meta.json")
    uris = {split: cfg.artifact(artifacts.FEATURES, f"{split}.npz") for split in FEATURE_SPLITS}
    local = {split: scratch / "features" / f"{split}.npz" for split in FEATURE_SPLITS}
    reuse = storage.exists(meta_uri) and storage.read_json(meta_uri) == key
    started = time.monotonic()
    if reuse:
        for split in FEATURE_SPLITS:
            storage.download(uris[split], local[split])
    else:
        paths = [stage_records(cfg, split, scratch) for split in FEATURE_SPLITS]
        for split, (x, y) in zip(FEATURE_SPLITS, extract_features(backbone, paths, cfg.image_size, cfg.batch_size)):
            local[split].parent.mkdir(parents=True, exist_ok=True)
            np.savez(local[split], features=x, labels=y)
            storage.upload(local[split], uris[split])
        storage.write_json(meta_uri, key)
    features = {}
    for split in FEATURE_SPLITS:
        with np.load(local[split]) as stored:
            features[split] = (stored["features"], stored["labels"])
    log.info("%s features of %d train + %d val images (%s) in %.1f s -> %s",
             "reused" if reuse else "computed", len(features["train"][1]), len(features["val"][1]),
             backbone.name, time.monotonic() - started, cfg.artifact(artifacts.FEATURES))
    return features


def save_model(model: keras.Model, scratch: Path, *uris: str) -> None:
    """Save as .keras once and upload that file to each URI."""
    local = scratch / "model.keras"
    model.save(local)
    for uri in uris:
        storage.upload(local, uri)
    local.unlink()
