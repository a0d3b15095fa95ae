"""Transfer learning against training from scratch, on the very same splits, for each benchmark, in one run.

Two benchmarks, each through the project's own acquire/subsample/train/
fine_tune steps with the default params (plus any `--set`; image_size auto is
decided from the benchmark's images as the DAG's candidates step does, and the
JSON line says which size ran, `*_image_size`):

- `fashion_mnist`: Fashion-MNIST, 10 % of train (5400 train / 600 val,
  stratified), the full 10k test split, seed 42 (28 px grayscale, centred);
- `openclipart`: clip art with transparency, 8 classes, all of train (about
  985 train / 110 val) and test images by other artists than the training
  images (bench/openclipart.py builds it from Debian's openclipart-png), seed 42.

Measures per benchmark:

- a small 2-conv CNN trained from scratch on the same train/val split (early
  stopping on validation), tested on the same test split;
- feature extraction with the default params (the pipeline's own `train` step:
  the backbone runs once per image), and its time as a ratio to ONE forward
  pass of the backbone over the same train+val images (`fe_ratio_to_forward`:
  each step is timed between two plain passes and compared with their mean, so a
  drift of the machine's speed moves both sides; `--fe-rounds` steps from nothing,
  default 3, the median reported, every ratio in `fe_ratios_to_forward`, because
  the 2-core VM's speed swings by a fifth from one pass to the next);
- fine-tuning with the default recipe (the pipeline's own `fine_tune` step, on
  cached boundary activations) and what the kept model scores on test;
- both models' test accuracy with test-time augmentation too (`*_tta_test_accuracy`:
  the mean of the probabilities of each image and its mirror image), and the
  validation -> test gap of the kept model (`ft_val_test_gap`);
- Fashion-MNIST only: the cost of one fine-tune epoch on cached activations
  against one on images, for a cut at the top 20 units, and what that ratio is
  by counting floating-point work (bench/fine_tune_sweep.py has the recipe sweep).

Ends with one JSON line of flat keys, each prefixed by the benchmark's name:
fashion_mnist_scratch_test_accuracy, fashion_mnist_fe_test_accuracy,
fashion_mnist_ft_test_accuracy, openclipart_ft_test_accuracy,
openclipart_ft_val_test_gap, ..., fashion_mnist_ft_epoch_ratio_cached_to_images,
and demo_params (the recipe measured).

    python bench/training.py [--run-root .bench-runs] [--scratch-epochs 30]
        [--benchmarks fashion_mnist openclipart] [--set image_size=128 --set fine_tune=always ...] [--no-scratch]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench import openclipart  # also proves, at once, that `bench` is importable (pip install -e .)
from bench.bracketed import bracketed_ratios, median_index
from bench.json_line import json_line
from tasks import artifacts, storage
from tasks.config import RunConfig, param_specs, planned_candidates
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE

if TYPE_CHECKING:
    import keras

    from tasks.backbone_split import Split

RATIO_UNITS = 20
BENCHMARKS = ("fashion_mnist", "openclipart")
# The from-scratch CNN's input: Fashion-MNIST's own 28 px (every pixel, nothing more); clip art at 64 px.
SCRATCH_IMAGE_SIZE = {"fashion_mnist": 28, "openclipart": 64}


def timed(step, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - started


def forward_seconds(cfg: RunConfig, scratch: Path) -> float:
    """One pass of the backbone over the train and val images, as feature extraction runs it (build not timed),
    into a folder of its own under `scratch`."""
    from tasks import activation_cache
    from tasks.backbone_split import split_backbone
    from tasks.backbones import load_backbone
    from tasks.training import stage_records

    backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
    whole = split_backbone(backbone, 0)
    records = stage_records(cfg, scratch)
    folder = Path(tempfile.mkdtemp(prefix="forward-", dir=scratch))
    return timed(activation_cache.cache_activations, whole.bottom, records, folder, {"bench": True}, cfg.batch_size)[1]


def forget_feature_extraction(cfg: RunConfig) -> None:
    """Delete what the train step left in the run root (features, checkpoints, history, model), so that it runs
    again from nothing instead of resuming."""
    for artifact in (artifacts.FEATURES, artifacts.checkpoints(FEATURE_EXTRACTION), artifacts.FEATURE_EXTRACTION_MODEL):
        storage.delete(cfg.artifact(artifact).rstrip("/") + "/")
    for artifact in (artifacts.HISTORY, artifacts.TRAIN_SUMMARY):
        storage.delete(cfg.artifact(artifact))


def test_accuracy(cfg: RunConfig, artifact: artifacts.Artifact, scratch: Path) -> tuple[float, float]:
    """The saved classifier's accuracy on the run's test split: plain, and with test-time augmentation
    (the mean of the probabilities of each image and its mirror image)."""
    import tensorflow as tf

    from tasks import classifier
    from tasks.records import image_dataset

    model = classifier.fetch(cfg.artifact(artifact), scratch, cfg.cache_dir).model
    test = storage.download(cfg.artifact(artifacts.split_records("test")), scratch / "test.tfrecord")
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    plain, mirrored, labels = [], [], []
    for images, batch_labels in image_dataset(test, int(model.input_shape[1]), cfg.batch_size):
        plain.append(forward(images).numpy())
        mirrored.append(forward(tf.reverse(images, axis=[2])).numpy())
        labels.append(batch_labels.numpy())
    probabilities, truth = np.concatenate(plain), np.concatenate(labels)
    averaged = (probabilities + np.concatenate(mirrored)) / 2
    return float((probabilities.argmax(axis=1) == truth).mean()), float((averaged.argmax(axis=1) == truth).mean())


def scratch_cnn(cfg: RunConfig, scratch: Path, epochs: int, image_size: int,
                num_classes: int) -> tuple[float, float, int]:
    """(test accuracy, seconds, epochs run) of a 2-conv CNN trained from random weights on the same split."""
    import keras

    from tasks.records import image_dataset
    from tasks.training import stage_records

    keras.utils.set_random_seed(cfg.seed)
    paths = stage_records(cfg, scratch, ("train", "val", "test"))
    model = keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dropout(0.3),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dense(num_classes, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # Decoded once into memory: large PNGs would otherwise be decoded again every epoch.
    (x_train, y_train), val, test = (arrays(image_dataset(paths[split], image_size, cfg.batch_size))
                                     for split in ("train", "val", "test"))
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True)
    started = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=cfg.batch_size, validation_data=val, epochs=epochs,
                        callbacks=[stop], verbose=0)
    seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(*test, batch_size=cfg.batch_size, verbose=0)
    return float(accuracy), seconds, len(history.history["loss"])


def arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a batched (image, label) dataset, in memory."""
    images, labels = zip(*((np.asarray(x), np.asarray(y)) for x, y in dataset), strict=False)
    return np.concatenate(images), np.concatenate(labels)


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


def demo_params(overrides: dict[str, str] | None = None) -> str:
    """The recipe measured (the default `make demo` runs, with any `--set` overrides), as one flat string."""
    keys = ("image_size", "epochs", "learning_rate", "fine_tune", "fine_tune_layers", "fine_tune_epochs",
            "fine_tune_lr_factor", "fine_tune_schedule", "augment", "mixup")
    specs = param_specs(RunConfig())
    values = {key: "auto" if specs[key][0] is None else specs[key][0] for key in keys} | dict(overrides or {})
    return ",".join(f"{key}={value}" for key, value in values.items())


def benchmark_config(name: str, run_root: str, overrides: dict[str, str]) -> RunConfig:
    """The run config of one benchmark: the defaults, the benchmark's data, then `--set` overrides."""
    data: dict[str, object] = {}
    if name == "openclipart":
        data = {"source": str(openclipart.build().resolve()), "train_percent": 100.0,
                "model_name": "openclipart-classifier"}
    specs = param_specs(RunConfig())
    values = {key: param_value(specs[key][1], value) for key, value in overrides.items()}
    return dataclasses.replace(RunConfig(run_root=run_root, run_id=f"bench-training-{name}"), **data, **values)


def param_value(schema: dict[str, object], text: str) -> object:
    """A `--set` value as its param's type (the schema's, so an optional param whose default is empty works too)."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    kind = next(kind for kind in kinds if kind != "null")
    if kind == "boolean":
        return text.lower() == "true"
    return {"integer": int, "number": float, "string": str}[kind](text)


def run_benchmark(name: str, cfg: RunConfig, scratch_epochs: int, epoch_ratios: bool, fe_rounds: int = 3
                  ) -> dict[str, object]:
    """Scratch / feature extraction / fine-tuned test accuracy (and timings) of one benchmark, keys unprefixed."""
    from tasks.scratch import scratch_dir
    from tasks.steps.acquire import acquire
    from tasks.steps.decide import decide
    from tasks.steps.fine_tune import fine_tune
    from tasks.steps.subsample import subsample
    from tasks.steps.train import train

    log = logging.getLogger("bench.training")
    storage.delete(cfg.run_uri + "/")
    data = subsample(cfg, acquire(cfg))
    manifest = storage.read_json(cfg.artifact(artifacts.MANIFEST))
    (candidate,) = planned_candidates(cfg, manifest)  # image_size auto is decided here, as the DAG's step does
    cfg = cfg.for_candidate(candidate)
    result: dict[str, object] = {}
    with scratch_dir(f"bench-training-{name}") as scratch:
        if scratch_epochs:
            scratch_accuracy, scratch_s, epochs = scratch_cnn(cfg, scratch, scratch_epochs, SCRATCH_IMAGE_SIZE[name],
                                                              len(manifest["classes"]))
            log.info("%s from scratch: test accuracy %.4f after %d epochs in %.1f s", name, scratch_accuracy, epochs,
                     scratch_s)
            result.update(scratch_test_accuracy=round(scratch_accuracy, 4), scratch_seconds=round(scratch_s, 1),
                          scratch_epochs=epochs)
        # each step between two plain passes, against their mean (a machine whose speed drifts moves both sides),
        # `fe_rounds` times from nothing; the median ratio is the measurement
        passes, steps = [forward_seconds(cfg, scratch)], []
        for round_ in range(fe_rounds):
            forget_feature_extraction(cfg)
            # an empty feature store: features stored earlier would make extraction look free
            os.environ["TLP_FEATURE_STORE"] = str(scratch / f"feature-store-{round_}")
            trained, seconds = timed(train, cfg, data, dataclasses.asdict(candidate))
            steps.append(seconds)
            passes.append(forward_seconds(cfg, scratch))
        ratios = bracketed_ratios(steps, passes)
        middle = median_index(ratios)
        fe_s, forward_before, forward_after = steps[middle], passes[middle], passes[middle + 1]
        forward_s = (forward_before + forward_after) / 2
        decision = decide(cfg, data, trained)
        fe_accuracy, fe_tta = test_accuracy(cfg, artifacts.FEATURE_EXTRACTION_MODEL, scratch / "fe")
        tuned, ft_s = timed(fine_tune, cfg, data, trained)
        kept = FINE_TUNE if tuned["val_accuracy"] > trained["val_accuracy"] else FEATURE_EXTRACTION
        ft_accuracy, ft_tta = test_accuracy(cfg, artifacts.MODELS[kept], scratch / "kept")
        val_after = max(tuned["val_accuracy"], trained["val_accuracy"])
        result.update({
            "fe_test_accuracy": round(fe_accuracy, 4),
            "fe_tta_test_accuracy": round(fe_tta, 4),
            "fe_val_accuracy": round(trained["val_accuracy"], 4),
            "fe_seconds": round(fe_s, 1),
            "forward_pass_seconds": round(forward_s, 1),
            "forward_pass_seconds_before": round(forward_before, 1),
            "forward_pass_seconds_after": round(forward_after, 1),
            "fe_ratio_to_forward": round(fe_s / forward_s, 2),
            "fe_ratios_to_forward": [round(ratio, 2) for ratio in ratios],
            "ft_test_accuracy": round(ft_accuracy, 4),
            "ft_tta_test_accuracy": round(ft_tta, 4),
            "ft_val_accuracy": round(val_after, 4),
            "ft_val_test_gap": round(val_after - ft_accuracy, 4),
            "ft_kept": kept,
            "ft_cut": tuned.get("cut"),
            "ft_seconds": round(ft_s, 1),
            "image_size": cfg.image_size,
            "auto_would_fine_tune": decision["fine_tune"],
            "images": data["counts"],
        })
        if scratch_epochs:
            result["transfer_gain_over_scratch"] = round(ft_accuracy - scratch_accuracy, 4)
        if epoch_ratios:
            on_cache, on_images, cut, by_flops = epoch_ratio(cfg, scratch, RATIO_UNITS)
            result.update({
                "ft_epoch_cut": cut,
                "ft_epoch_seconds_cached": round(on_cache, 2),
                "ft_epoch_seconds_images": round(on_images, 2),
                "ft_epoch_ratio_cached_to_images": round(on_cache / on_images, 2),
                "ft_epoch_ratio_by_flops": round(by_flops, 2),
            })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", default=".bench-runs")
    parser.add_argument("--scratch-epochs", type=int, default=30)
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch CNNs")
    parser.add_argument("--no-ratio", action="store_true", help="skip the cached/images epoch ratio")
    parser.add_argument("--fe-rounds", type=int, default=3,
                        help="feature extractions timed from nothing, each between two plain passes (median kept)")
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                        help="override a run param for every benchmark (repeatable)")
    args = parser.parse_args()
    if args.fe_rounds < 1:
        parser.error(f"--fe-rounds {args.fe_rounds}: feature extraction must be timed at least once; give 1 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = dict(item.split("=", 1) for item in args.set)
    line: dict[str, object] = {}
    for name in args.benchmarks:
        cfg = benchmark_config(name, args.run_root, overrides)
        result = run_benchmark(name, cfg, 0 if args.no_scratch else args.scratch_epochs,
                               epoch_ratios=name == "fashion_mnist" and not args.no_ratio, fe_rounds=args.fe_rounds)
        line.update({f"{name}_{key}": value for key, value in result.items()})
    line["demo_params"] = demo_params(overrides)
    print(json_line(line))


if __name__ == "__main__":
    main()
