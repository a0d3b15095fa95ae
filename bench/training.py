"""Training quality and speed on Fashion-MNIST, with times as ratios to one backbone forward pass.

The setting of the issue: 10 classes, 10 % of train (stratified 10 % of that
for validation), the full test set, the offline EfficientNet-Lite0 at 96 px.
Reports test accuracy after feature extraction and after fine-tuning, each
phase's wall time, and two ratios to the time of ONE forward pass of the
backbone over the same train+validation images (measured just before and just
after feature extraction, in the same process, through the same tf.data
pipeline, and averaged):

- feature-extraction step time / forward pass (goal ≤ 1.25 for 10 epochs: the
  backbone runs once per image, the head trains on cached features);
- the same for the augmented path, where the backbone runs every epoch.

Ratios are given on wall time and on this process's CPU time; on a shared
machine the CPU-time ratio is the steadier one, and absolute seconds are noisy.

    python bench/training.py [--run-root .runs] [--epochs 10] [--fine-tune-epochs 5] [--augment-epochs 10]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path


from tasks import artifacts, storage  # noqa: E402
from tasks.config import RunConfig  # noqa: E402

TRAINING_OUTPUTS = (artifacts.FEATURES.parts, artifacts.CHECKPOINTS.parts, artifacts.TENSORBOARD.parts, ("model",), ("train",))


@dataclasses.dataclass
class Timing:
    """Wall seconds and this process's CPU seconds (all threads): CPU time is far less
    sensitive to other processes on a shared machine, so ratios are given on both."""

    wall: float
    cpu: float

    def ratio(self, other: "Timing") -> dict[str, float]:
        return {"wall": round(self.wall / other.wall, 2), "cpu": round(self.cpu / other.cpu, 2)}

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1)}


def timed(step, *args) -> tuple[object, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = step(*args)
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def forward_pass(cfg: RunConfig) -> Timing:
    """One backbone pass over the train and validation images, as feature extraction runs it (load not timed)."""
    from tasks.backbones import load_backbone
    from tasks.train import extract_features, stage_records

    backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as scratch:
        paths = [stage_records(cfg, split, Path(scratch)) for split in ("train", "val")]
        return timed(extract_features, backbone, paths, cfg.image_size, cfg.batch_size)[1]


def test_accuracy(cfg: RunConfig, model_parts: tuple[str, ...]) -> float:
    import keras

    from tasks.predict import predict_records

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as scratch:
        model = keras.models.load_model(storage.download(cfg.artifact(model_parts), Path(scratch, "m.keras")))
        test = storage.download(cfg.artifact(artifacts.split_records("test")), Path(scratch, "test.tfrecord"))
        probabilities, labels, _ = predict_records(model, test, cfg.batch_size)
    return float((probabilities.argmax(axis=1) == labels).mean())


def fresh(cfg: RunConfig) -> None:
    """Remove an earlier bench's training outputs so nothing resumes from them (the data stays)."""
    for parts in TRAINING_OUTPUTS:
        storage.delete(storage.join(cfg.run_uri, *parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", default=".runs")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=5, help="0 skips fine-tuning")
    parser.add_argument("--augment-epochs", type=int, default=10, help="0 skips the augmented path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from tasks.decide import decide
    from tasks.fine_tune import fine_tune
    from tasks.acquire import acquire
    from tasks.subsample import subsample
    from tasks.train import train

    # patience = epochs: every run does all its epochs, so the ratios are for exactly that many epochs
    cfg = RunConfig(source="idx://fashion_mnist", train_percent=10, val_fraction=0.1, test_percent=100,
                    backbone="efficientnet_lite0", image_size=96, epochs=args.epochs, patience=args.epochs,
                    fine_tune_epochs=max(args.fine_tune_epochs, 1), run_root=args.run_root, run_id="bench-training")
    if not storage.exists(cfg.artifact(artifacts.MANIFEST)):
        subsample(cfg, acquire(cfg))
    counts = storage.read_json(cfg.artifact(artifacts.MANIFEST))["counts"]
    sizes = {split: sum(per_class.values()) for split, per_class in counts.items()}
    fresh(cfg)

    before = forward_pass(cfg)
    trained, train_time = timed(train, cfg)
    after = forward_pass(cfg)  # before and after: the mean follows drifting machine load
    forward = Timing((before.wall + after.wall) / 2, (before.cpu + after.cpu) / 2)
    results = {
        "images": sizes, "forward_pass": {**forward.as_dict(), "before_wall_s": round(before.wall, 1),
                                          "after_wall_s": round(after.wall, 1)},
        "feature_extraction": {"epochs": trained["epochs_run"], **train_time.as_dict(),
                               "ratio_to_forward": train_time.ratio(forward),
                               "val_accuracy": trained["val_accuracy"],
                               "test_accuracy": test_accuracy(cfg, artifacts.FEATURE_EXTRACTION_MODEL)},
        "decision_with_default_rule": decide(storage.read_json(cfg.artifact(artifacts.HISTORY)),
                                             RunConfig())["reason"],
    }
    if args.fine_tune_epochs:
        tuned, tune_time = timed(fine_tune, cfg)
        results["fine_tune"] = {"epochs": tuned["epochs_run"], **tune_time.as_dict(),
                                "unfrozen_layers": len(tuned["unfrozen_layers"]),
                                "val_accuracy": tuned["val_accuracy_after"], "kept": tuned["kept"],
                                "test_accuracy": test_accuracy(cfg, artifacts.FINE_TUNED_MODEL)}
    if args.augment_epochs:
        augmented = dataclasses.replace(cfg, run_id="bench-training-augment", augment=True,
                                        epochs=args.augment_epochs, patience=args.augment_epochs)
        fresh(augmented)
        with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
            storage.upload(storage.download(storage.join(cfg.run_uri, "data"), Path(scratch)), storage.join(augmented.run_uri, "data"))
        result, augment_time = timed(train, augmented)
        results["augmented_feature_extraction"] = {
            "epochs": result["epochs_run"], **augment_time.as_dict(),
            "ratio_to_forward": augment_time.ratio(forward),
            "val_accuracy": result["val_accuracy"],
            "test_accuracy": test_accuracy(augmented, artifacts.FEATURE_EXTRACTION_MODEL)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
