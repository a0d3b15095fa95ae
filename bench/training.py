"""Transfer learning against training from scratch, on the very same split, in one run.

The offline default of the issue: Fashion-MNIST, 10 % of train (5400 train /
600 val, stratified), the full 10k test split, seed 42. Measures:

- a small 2-conv CNN trained from scratch on the same train/val split (early
  stopping on validation), tested on the same test split;
- feature extraction with the default params (the pipeline's own `train` step:
  the backbone runs once per image), and its time as a ratio to ONE forward
  pass of the backbone over the same train+val images;
- fine-tuning with the default recipe (the pipeline's own `fine_tune` step, on
  cached boundary activations) and what the kept model scores on test;
- the cost of one fine-tune epoch on cached activations against one on images,
  for a cut at the top 20 units, and what that ratio is by counting
  floating-point work (bench/fine_tune_sweep.py has the recipe sweep).

Ends with one JSON line of flat keys: scratch_test_accuracy, fe_test_accuracy,
ft_test_accuracy, fe_ratio_to_forward, ft_epoch_ratio_cached_to_images,
ft_epoch_ratio_by_flops, demo_params, and the timings behind them.

    python bench/training.py [--run-root .bench-runs] [--scratch-epochs 30]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import artifacts, storage
from tasks.config import RunConfig, candidate_list, param_specs
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE

if TYPE_CHECKING:
    import keras

    from tasks.backbone_split import Split

RATIO_UNITS = 20
SCRATCH_IMAGE_SIZE = 28  # Fashion-MNIST's own size: the from-scratch CNN sees every pixel, nothing more


def timed(step, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - started


def forward_seconds(cfg: RunConfig, scratch: Path) -> float:
    """One pass of the backbone over the train and val images, as feature extraction runs it (build not timed)."""
    from tasks import activation_cache
    from tasks.backbone_split import split_backbone
    from tasks.backbones import load_backbone
    from tasks.training import stage_records

    backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
    whole = split_backbone(backbone, 0)
    records = stage_records(cfg, scratch)
    return timed(activation_cache.cache_activations, whole.bottom, records, scratch / "forward", {"bench": True},
                 cfg.batch_size)[1]


def test_accuracy(cfg: RunConfig, artifact: artifacts.Artifact, scratch: Path) -> float:
    """The saved classifier's accuracy on the run's test split."""
    from tasks import classifier
    from tasks.predict import predict_records

    model = classifier.fetch(cfg.artifact(artifact), scratch, cfg.cache_dir).model
    test = storage.download(cfg.artifact(artifacts.split_records("test")), scratch / "test.tfrecord")
    probabilities, labels, _ = predict_records(model, test, cfg.batch_size)
    return float((probabilities.argmax(axis=1) == labels).mean())


def scratch_cnn(cfg: RunConfig, scratch: Path, epochs: int) -> tuple[float, float, int]:
    """(test accuracy, seconds, epochs run) of a 2-conv CNN trained from random weights on the same split."""
    import keras

    from tasks.records import image_dataset
    from tasks.training import Feed, stage_records

    keras.utils.set_random_seed(cfg.seed)
    paths = stage_records(cfg, scratch, ("train", "val", "test"))
    model = keras.Sequential([
        keras.Input((SCRATCH_IMAGE_SIZE, SCRATCH_IMAGE_SIZE, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dropout(0.3),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    first_epoch = Feed.of(cfg, 0).epoch_seed(0)
    train = image_dataset(paths["train"], SCRATCH_IMAGE_SIZE, cfg.batch_size, shuffle_seed=first_epoch)
    val = image_dataset(paths["val"], SCRATCH_IMAGE_SIZE, cfg.batch_size)
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True)
    started = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=epochs, callbacks=[stop], verbose=0)
    seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(image_dataset(paths["test"], SCRATCH_IMAGE_SIZE, cfg.batch_size), verbose=0)
    return float(accuracy), seconds, len(history.history["loss"])


def epoch_ratio(cfg: RunConfig, scratch: Path, units: int) -> tuple[float, float, str, float]:
    """(seconds of a fine-tune epoch on cached activations, on images, the cut, the ratio by FLOPs)
    for the top `units` units.

    Both are the second epoch of the same model and settings (the first pays tracing).
    """
    from bench.fine_tune_sweep import epoch_seconds_on_cache, epoch_seconds_on_images
    from tasks import activation_cache, classifier
    from tasks.backbone_split import split_backbone
    from tasks.training import stage_records

    built = classifier.fetch(cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL), scratch, cfg.cache_dir)
    split = split_backbone(built.backbone, units)
    records = stage_records(cfg, scratch)
    manifest = storage.read_json(cfg.artifact(artifacts.MANIFEST))
    cached = activation_cache.cache_activations(split.bottom, records, scratch / "ratio",
                                                activation_cache.cache_key(built.backbone, split, manifest["hash"]),
                                                cfg.batch_size)
    num_classes = len(manifest["classes"])
    on_cache, _ = epoch_seconds_on_cache(cfg, split, built.head, cached["train"], built.backbone, num_classes)
    steps = math.ceil(len(cached["train"]) / cfg.batch_size)
    on_images, _ = epoch_seconds_on_images(cfg, built.backbone, built.head, split.units, records, steps, num_classes)
    return on_cache, on_images, split.cut, ratio_by_flops(split)


def ratio_by_flops(split: Split) -> float:
    """The cached/images epoch ratio for this cut if every floating-point operation cost the same.

    Training the top costs about three of its forward passes (forward, weight
    gradients, input gradients); an epoch on images adds one forward pass of the
    bottom, and that is all the cache can save. Counted from the traced graphs
    with TensorFlow's profiler; the measured ratio differs by how efficiently
    each part runs (the image pipeline, small late feature maps).
    """
    top = 3 * forward_flops(split.top, split.boundary_shape)
    return top / (top + forward_flops(split.bottom, tuple(split.bottom.input_shape[1:])))


def forward_flops(model: keras.Model, shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass of `model` on one input of `shape` (inference mode)."""
    import tensorflow as tf

    traced = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec((1, *shape)))
    options = {**tf.compat.v1.profiler.ProfileOptionBuilder.float_operation(), "output": "none"}
    return tf.compat.v1.profiler.profile(graph=traced.graph, options=options).total_float_ops


def demo_params() -> str:
    """The default recipe `make demo` runs, as one flat string."""
    keys = ("image_size", "epochs", "learning_rate", "fine_tune", "fine_tune_layers", "fine_tune_epochs",
            "fine_tune_lr_factor", "fine_tune_schedule", "augment")
    specs = param_specs(RunConfig())
    return ",".join(f"{key}={specs[key][0]}" for key in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", default=".bench-runs")
    parser.add_argument("--scratch-epochs", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from tasks.scratch import scratch_dir
    from tasks.steps.acquire import acquire
    from tasks.steps.fine_tune import fine_tune
    from tasks.steps.subsample import subsample
    from tasks.steps.train import train

    base = RunConfig(run_root=args.run_root, run_id="bench-training")
    (candidate,) = candidate_list(base)
    cfg = base.for_candidate(candidate)
    storage.delete(cfg.run_uri + "/")
    data = subsample(cfg, acquire(cfg))
    log = logging.getLogger("bench.training")
    with scratch_dir("bench-training") as scratch:
        scratch_accuracy, scratch_s, scratch_epochs = scratch_cnn(cfg, scratch, args.scratch_epochs)
        log.info("from scratch: test accuracy %.4f after %d epochs in %.1f s", scratch_accuracy, scratch_epochs,
                 scratch_s)
        forward_s = forward_seconds(cfg, scratch)
        trained, fe_s = timed(train, cfg, data, dataclasses.asdict(candidate))
        fe_accuracy = test_accuracy(cfg, artifacts.FEATURE_EXTRACTION_MODEL, scratch / "fe")
        tuned, ft_s = timed(fine_tune, cfg, data, trained)
        kept = FINE_TUNE if tuned["val_accuracy"] > trained["val_accuracy"] else FEATURE_EXTRACTION
        ft_accuracy = test_accuracy(cfg, artifacts.MODELS[kept], scratch / "kept")
        on_cache, on_images, cut, by_flops = epoch_ratio(cfg, scratch, RATIO_UNITS)
    print(json.dumps({
        "scratch_test_accuracy": round(scratch_accuracy, 4),
        "scratch_seconds": round(scratch_s, 1),
        "scratch_epochs": scratch_epochs,
        "fe_test_accuracy": round(fe_accuracy, 4),
        "fe_val_accuracy": round(trained["val_accuracy"], 4),
        "fe_seconds": round(fe_s, 1),
        "forward_pass_seconds": round(forward_s, 1),
        "fe_ratio_to_forward": round(fe_s / forward_s, 2),
        "ft_test_accuracy": round(ft_accuracy, 4),
        "ft_val_accuracy": round(tuned["val_accuracy"], 4),
        "ft_kept": kept,
        "ft_cut": tuned["cut"],
        "ft_seconds": round(ft_s, 1),
        "transfer_gain_over_scratch": round(ft_accuracy - scratch_accuracy, 4),
        "ft_epoch_cut": cut,
        "ft_epoch_seconds_cached": round(on_cache, 2),
        "ft_epoch_seconds_images": round(on_images, 2),
        "ft_epoch_ratio_cached_to_images": round(on_cache / on_images, 2),
        "ft_epoch_ratio_by_flops": round(by_flops, 2),
        "demo_params": demo_params(),
    }))


if __name__ == "__main__":
    main()
