"""Fine-tuning recipes on cached boundary activations: accuracy and seconds per recipe, on the offline default.

The setting of issue 11: Fashion-MNIST, 10 % of train (10 % of that for
validation), the full 10k test split, EfficientNet-Lite0, seed 42, made by the
project's own acquire and subsample steps into `--run-root`. Feature extraction
trains the head on cached pooled features (the activations of the whole
backbone); each recipe then restores the pretrained backbone and that head,
cuts the backbone (tasks/backbone_split.py), and trains top + head on the cut's
cached activations (tasks/activation_cache.py) through the pipeline's own
resumable fit loop (early stopping on val_accuracy, best epoch kept). The
better of before/after on validation is kept, as the fine-tune step does.

A recipe: units (rounded to a clean cut), learning rate, epochs, schedule
(constant, cosine decay to 0 over the epochs, or warmup_cosine: the fine-tune
step's one-epoch warm-up then cosine), label smoothing (0, or e.g. 0.1 with
one-hot targets), depthwise (train, or frozen: the top's depthwise kernels keep
their pretrained weights) and batch (the batch size; default the config's).
Seconds: caching the train+val activations at the cut (what the fine-tune
step pays; test activations are cached apart, for
scoring only) and per epoch of training (validation and checkpoint included).
Activation caches persist under `--cache-root` and are reused by later runs
(their first computing time is kept beside them).

`--ratio-units` also times one fine-tuning epoch on images against one on
cached activations for the same cut (second epochs, after tracing).

    python -m bench.fine_tune_sweep [--benchmark fashion_mnist|openclipart] [--backbone efficientnet_lite0]
        [--image-size 96] [--ratio-units 20] [--jsonl results.jsonl]
        [--recipe units=34,lr=1e-3,epochs=8,schedule=warmup_cosine,depthwise=frozen,batch=128 ...]

Logs one line per step and recipe; ends with ONE JSON line of flat keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tasks import artifacts, storage
from tasks.activation_cache import CachedSplit, cache_activations, cache_key
from tasks.backbone_split import Split, split_backbone
from tasks.backbones import Backbone, load_backbone, set_trainable_top
from tasks.checkpoints import Stopping, fit_resumable
from tasks.config import RunConfig
from tasks.head import build_head, compose
from tasks.records import image_dataset
from tasks.training import Feed, cached_epochs, compile_model

log = logging.getLogger("bench.fine_tune_sweep")

SCHEDULES = ("constant", "cosine", "warmup_cosine")  # warmup_cosine: the fine-tune step's (fine_tune.learning_rate)
TIMING = "bench-seconds.json"


@dataclasses.dataclass(frozen=True)
class Recipe:
    units: int
    lr: float
    epochs: int
    schedule: str = "constant"
    smoothing: float = 0.0
    depthwise: bool = True  # False: the top's depthwise (spatial) kernels stay frozen
    batch: int = 0  # 0: the config's batch size

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """'units=19,lr=3e-4,epochs=8,schedule=cosine,smoothing=0.1,depthwise=frozen,batch=128' (units, lr and
        epochs required)."""
        values = dict(part.split("=", 1) for part in text.split(","))
        recipe = cls(units=int(values["units"]), lr=float(values["lr"]), epochs=int(values["epochs"]),
                     schedule=values.get("schedule", "constant"), smoothing=float(values.get("smoothing", 0)),
                     depthwise=values.get("depthwise", "train") == "train", batch=int(values.get("batch", 0)))
        if recipe.schedule not in SCHEDULES:
            raise SystemExit(f"recipe {text!r}: schedule must be one of {SCHEDULES}")
        return recipe

    def name(self, cut: str) -> str:
        """Flat-key prefix, e.g. cut_block5c_lr3e-4_ep8_cosine_ls0.1."""
        name = f"cut_{cut}_lr{_short(self.lr)}_ep{self.epochs}"
        if self.schedule != "constant":
            name += f"_{self.schedule}"
        name += f"_ls{self.smoothing:g}" if self.smoothing else ""
        name += "" if self.depthwise else "_dwfrozen"
        return name + (f"_bs{self.batch}" if self.batch else "")


# today's default (top 20 -> 19 units, 1e-3 x 0.1, 5 epochs), the recommended default, the 96 px preset
DEFAULT_RECIPES = ("units=19,lr=1e-4,epochs=5", "units=34,lr=1e-3,epochs=8,schedule=cosine",
                   "units=37,lr=1e-3,epochs=8,schedule=cosine")


def _short(value: float) -> str:
    """1e-4 -> '1e-4', 0.0003 -> '3e-4'."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def timed(step, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - started


def cpu_timed(step, *args, **kwargs) -> tuple[Any, float, float]:
    """(result, wall seconds, this process's CPU seconds): on a shared machine CPU time is the steadier one."""
    cpu = time.process_time()
    result, wall = timed(step, *args, **kwargs)
    return result, wall, time.process_time() - cpu


def prepare_data(cfg: RunConfig) -> float:
    """Acquire and subsample into the run root unless a manifest is there; the seconds it took."""
    from tasks.steps.acquire import acquire
    from tasks.steps.subsample import subsample

    if storage.exists(cfg.artifact(artifacts.MANIFEST)):
        return 0.0
    started = time.perf_counter()
    subsample(cfg, acquire(cfg))
    return time.perf_counter() - started


def cached_splits(split: Split, backbone: Backbone, cfg: RunConfig, records: dict[str, Path], data_hash: str,
                  root: Path) -> tuple[dict[str, CachedSplit], dict[str, float]]:
    """Train+val and test activations at the cut, and the seconds their first computation took."""
    key = cache_key(backbone, split, data_hash)
    folder = root / f"px{cfg.image_size}" / split.cut
    cached, seconds = {}, {}
    for part, names in (("fit", ("train", "val")), ("test", ("test",))):
        directory = folder / part
        timing = directory / TIMING
        reused = timing.is_file() and json.loads(timing.read_text()).get("key") == key
        splits, elapsed = timed(cache_activations, split.bottom, {n: records[n] for n in names}, directory, key,
                                cfg.batch_size)
        if not reused:
            timing.write_text(json.dumps({"key": key, "seconds": elapsed}))
        cached |= splits
        seconds[part] = json.loads(timing.read_text())["seconds"]
    return cached, seconds


def accuracy(model: keras.Model, cached: CachedSplit, batch_size: int) -> float:
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    hits = sum(int((np.argmax(forward(x).numpy(), axis=1) == y.numpy()).sum())
               for x, y in cached.batches(batch_size))
    return hits / len(cached)


def train_on_cache(model: keras.Model, cfg: RunConfig, cached: dict[str, CachedSplit], phase: str, start: int,
                   epochs: int, num_classes: int, scratch: Path) -> dict[str, Any]:
    """fit_resumable over cached activations (fresh: no checkpoint of an earlier bench is resumed)."""
    checkpoint_uri = storage.join(cfg.run_uri, "bench-checkpoints", phase)
    storage.delete(checkpoint_uri)
    result, seconds, cpu = cpu_timed(
        fit_resumable, model, phase=phase, first_epoch=start, last_epoch=start + epochs,
        epochs=cached_epochs(Feed.of(cfg, num_classes), cached), stopping=Stopping(cfg.patience, cfg.min_delta),
        fingerprint={"phase": phase}, checkpoint_uri=checkpoint_uri,
        tensorboard_uri=storage.join(cfg.run_uri, "bench-tensorboard", phase), scratch=scratch)
    return {"val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch - start,
            "epochs_run": len(result.history), "train_s": round(seconds, 1),
            "epoch_s": round(seconds / len(result.history), 2), "epoch_cpu_s": round(cpu / len(result.history), 2),
            "val_curve": [round(entry["val_accuracy"], 4) for entry in result.history]}


def on_top(split: Split, head: keras.Model) -> keras.Model:
    """Boundary activations -> top -> head: what fine-tuning trains on cached activations."""
    boundary = keras.Input(split.boundary_shape, name="boundary")
    return keras.Model(boundary, head(split.top(boundary, training=False)), name="top_and_head")


def feature_extraction(cfg: RunConfig, backbone: Backbone, records: dict[str, Path], data_hash: str,
                       num_classes: int, cache_root: Path, scratch: Path) -> tuple[keras.Model, dict[str, Any]]:
    """Step 3 on cached pooled features (the cut at the output): the trained head and its numbers."""
    split = split_backbone(backbone, 0)
    cached, cache_seconds = cached_splits(split, backbone, cfg, records, data_hash, cache_root)
    keras.utils.set_random_seed(cfg.seed)
    head = build_head(split.boundary_shape, num_classes, cfg.dropout)
    compile_model(head, cfg.optimizer, keras.losses.get(cfg.loss), cfg.learning_rate, backbone)
    trained = train_on_cache(head, cfg, cached, "sweep-feature-extraction", 0, cfg.epochs, num_classes, scratch)
    return head, {**trained, "cache_train_val_s": round(cache_seconds["fit"], 1),
                  "cache_test_s": round(cache_seconds["test"], 1),
                  "test_accuracy": accuracy(head, cached["test"], cfg.batch_size)}


def run_recipe(recipe: Recipe, split: Split, cached: dict[str, CachedSplit], cfg: RunConfig, backbone: Backbone,
               head: keras.Model, start: int, before: dict[str, Any], num_classes: int,
               scratch: Path) -> dict[str, Any]:
    """Train top + head from the feature-extraction state; keep the better of before/after on validation."""
    from tasks.steps.fine_tune import learning_rate as fine_tune_rate

    cfg = dataclasses.replace(cfg, batch_size=recipe.batch or cfg.batch_size)
    steps = math.ceil(len(cached["train"]) / cfg.batch_size)
    if recipe.schedule == "warmup_cosine":
        learning_rate = fine_tune_rate(recipe.lr, "cosine", recipe.epochs, steps)
    else:
        learning_rate = recipe.lr if recipe.schedule == "constant" else keras.optimizers.schedules.CosineDecay(
            recipe.lr, decay_steps=recipe.epochs * steps)
    for layer in split.top._flatten_layers():  # everything above the cut is unfrozen (split_backbone)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.trainable = recipe.depthwise
    smoothing_cfg = dataclasses.replace(cfg, loss="categorical_crossentropy") if recipe.smoothing else cfg
    loss = (keras.losses.CategoricalCrossentropy(label_smoothing=recipe.smoothing) if recipe.smoothing
            else keras.losses.get(cfg.loss))
    model = on_top(split, head)
    compile_model(model, smoothing_cfg.optimizer, loss, learning_rate, backbone)
    trained = train_on_cache(model, smoothing_cfg, cached, "sweep-fine-tune", start, recipe.epochs, num_classes,
                             scratch)
    tuned_test = accuracy(model, cached["test"], cfg.batch_size)
    kept = "fine_tuned" if trained["val_accuracy"] > before["val_accuracy"] else "feature_extraction"
    return {**dataclasses.asdict(recipe), "cut": split.cut, "units_unfrozen": split.units, **trained,
            "tuned_test_accuracy": tuned_test, "kept": kept,
            "test_accuracy": tuned_test if kept == "fine_tuned" else before["test_accuracy"]}


def epoch_seconds_on_images(cfg: RunConfig, backbone: Backbone, head: keras.Model, units: int,
                            records: dict[str, Path], steps: int, num_classes: int) -> tuple[float, float]:
    """(Wall, CPU) seconds of the second fine-tuning epoch on images (the step before caching existed)."""
    set_trainable_top(backbone, units)
    model = compose(backbone, head)
    compile_model(model, cfg.optimizer, keras.losses.get(cfg.loss), cfg.learning_rate * cfg.fine_tune_lr_factor,
                  backbone)
    feed = Feed.of(cfg, num_classes)
    epochs = image_dataset(records["train"], cfg.image_size, cfg.batch_size, shuffle_seed=feed.epoch_seed(0))
    return _second_epoch_seconds(model, epochs.map(feed.targets()).repeat(2), steps)


def epoch_seconds_on_cache(cfg: RunConfig, split: Split, head: keras.Model, cached: CachedSplit,
                           backbone: Backbone, num_classes: int) -> tuple[float, float]:
    """(Wall, CPU) seconds of the second fine-tuning epoch on cached activations, same cut and settings."""
    model = on_top(split, head)
    compile_model(model, cfg.optimizer, keras.losses.get(cfg.loss), cfg.learning_rate * cfg.fine_tune_lr_factor,
                  backbone)
    feed = Feed.of(cfg, num_classes)
    epochs = cached.batches(cfg.batch_size, feed.epoch_seed(0)).map(feed.targets())
    return _second_epoch_seconds(model, epochs.repeat(2), math.ceil(len(cached) / cfg.batch_size))


class _EpochClock(keras.callbacks.Callback):
    """(wall, CPU) seconds of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[tuple[float, float]] = []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.seconds.append((time.perf_counter() - self._started[0], time.process_time() - self._started[1]))


def _second_epoch_seconds(model: keras.Model, two_epochs, steps: int) -> tuple[float, float]:
    clock = _EpochClock()
    model.fit(two_epochs, epochs=2, steps_per_epoch=steps, callbacks=[clock], verbose=0)
    return clock.seconds[1]


def flatten(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per recipe <name>_<field> for the numbers that matter; the frontier and the best recipe, chosen on validation.

    The frontier: fine-tuned models that no other beats on both fine-tune
    seconds and validation accuracy (the test split never chooses).
    """
    flat: dict[str, Any] = {}
    for result in results:
        for field in ("units_unfrozen", "val_accuracy", "test_accuracy", "tuned_test_accuracy", "epochs_run",
                      "cache_train_val_s", "epoch_s", "epoch_cpu_s", "fine_tune_s", "kept"):
            flat[f"{result['name']}_{field}"] = result[field]
    tuned = [result for result in results if result["kept"] == "fine_tuned"]
    frontier = [result for result in tuned if not any(
        other["fine_tune_s"] <= result["fine_tune_s"] and other["val_accuracy"] > result["val_accuracy"]
        for other in tuned)]
    flat["frontier"] = ",".join(result["name"] for result in sorted(frontier, key=lambda r: r["fine_tune_s"]))
    if results:
        best = max(results, key=lambda result: result["val_accuracy"])
        flat |= {"best_on_val": best["name"], "best_on_val_test_accuracy": best["test_accuracy"],
                 "best_on_val_fine_tune_s": best["fine_tune_s"]}
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", default="/tmp/tlp-bench/runs")
    parser.add_argument("--cache-root", default="/tmp/tlp-bench/activations")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: image_size auto, decided from the benchmark's images as a pipeline run does")
    parser.add_argument("--benchmark", choices=("fashion_mnist", "openclipart"), default="fashion_mnist",
                        help="openclipart: all of bench/openclipart.py's train split, its held-out-artist test split")
    parser.add_argument("--backbone", default=RunConfig.backbone)
    parser.add_argument("--recipe", action="append", help=f"repeatable; default: {' '.join(DEFAULT_RECIPES)}")
    parser.add_argument("--ratio-units", type=int, default=20,
                        help="time an epoch on images vs on cached activations at this cut; 0 skips")
    parser.add_argument("--jsonl", help="append each recipe's full result to this file as it finishes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipes = [Recipe.parse(text) for text in args.recipe or DEFAULT_RECIPES]

    started = time.perf_counter()
    data: dict[str, Any] = {}
    if args.benchmark == "openclipart":
        from bench import openclipart

        data = {"source": str(openclipart.build().resolve()), "train_percent": 100.0}
    cfg = RunConfig(run_root=args.run_root, run_id=f"fine-tune-sweep-{args.benchmark}", image_size=args.image_size,
                    backbone=args.backbone, **data)
    data_s = prepare_data(cfg)
    manifest_uri = cfg.artifact(artifacts.MANIFEST)  # as subsample would hand it over
    manifest = artifacts.read_manifest(cfg, {"manifest": manifest_uri, "hash": storage.read_json(manifest_uri)["hash"]})
    cfg = cfg.with_image_size(manifest)
    num_classes = len(manifest["classes"])
    records = {split: storage.local_path(cfg.artifact(artifacts.split_records(split)))
               for split in ("train", "val", "test")}
    backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
    pretrained = backbone.model.get_weights()
    flat: dict[str, Any] = {"benchmark": args.benchmark, "backbone": cfg.backbone, "image_size": cfg.image_size,
                            "data_s": round(data_s, 1),
                            "train_images": len(manifest["files"])}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fine-tune-") as scratch_dir:
        scratch = Path(scratch_dir)
        head, before = feature_extraction(cfg, backbone, records, manifest["sha256"], num_classes,
                                          Path(args.cache_root), scratch)
        flat |= {f"feature_extraction_{key}": value for key, value in before.items() if key != "val_curve"}
        log.info("feature extraction: val %.4f test %.4f (%s)", before["val_accuracy"], before["test_accuracy"],
                 before)
        fitted_head = head.get_weights()
        for units in dict.fromkeys(recipe.units for recipe in recipes):
            backbone.model.set_weights(pretrained)
            split = split_backbone(backbone, units)
            cached, cache_seconds = cached_splits(split, backbone, cfg, records, manifest["sha256"],
                                                  Path(args.cache_root))
            for recipe in (recipe for recipe in recipes if recipe.units == units):
                backbone.model.set_weights(pretrained)
                head.set_weights(fitted_head)
                keras.utils.set_random_seed(cfg.seed)
                result = run_recipe(recipe, split, cached, cfg, backbone, head, before["epochs_run"], before,
                                    num_classes, scratch)
                result |= {"name": recipe.name(split.cut), "image_size": cfg.image_size,
                           "cache_train_val_s": round(cache_seconds["fit"], 1),
                           "fine_tune_s": round(cache_seconds["fit"] + result["train_s"], 1)}
                results.append(result)
                log.info("recipe %s: %s", result["name"], result)
                if args.jsonl:
                    with open(args.jsonl, "a") as out:
                        out.write(json.dumps(result) + "\n")
        if args.ratio_units:
            backbone.model.set_weights(pretrained)
            head.set_weights(fitted_head)
            split = split_backbone(backbone, args.ratio_units)
            cached, _ = cached_splits(split, backbone, cfg, records, manifest["sha256"], Path(args.cache_root))
            on_cache = epoch_seconds_on_cache(cfg, split, head, cached["train"], backbone, num_classes)
            on_images = epoch_seconds_on_images(cfg, backbone, head, split.units, records,
                                                math.ceil(len(cached["train"]) / cfg.batch_size), num_classes)
            flat |= {"ft_epoch_cut": split.cut, "ft_epoch_units": split.units,
                     "ft_epoch_seconds_cached": round(on_cache[0], 2),
                     "ft_epoch_seconds_images": round(on_images[0], 2),
                     "ft_epoch_cpu_seconds_cached": round(on_cache[1], 2),
                     "ft_epoch_cpu_seconds_images": round(on_images[1], 2),
                     "ft_epoch_ratio_cached_to_images": round(on_cache[0] / on_images[0], 3),
                     "ft_epoch_cpu_ratio_cached_to_images": round(on_cache[1] / on_images[1], 3)}
            log.info("epoch at cut %s: %s (wall, CPU) s cached, %s on images", split.cut, on_cache, on_images)
    flat |= flatten(results) | {"total_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(flat))


if __name__ == "__main__":
    main()
