"""Retraining that knows what changed, measured in one run on Fashion-MNIST (offline).

1. A first run trains on folder A (`--per-class` train images per class) and its records become the champion's
   (manifest, params and model written to a local registry as publish would; publish itself is not run).
2. No-op: the steps a retrain runs on unchanged data (acquire, subsample, check_changes), timed in process.
3. Incremental: folder B = A + 10 % new images per class. The retrain's backbone work (images through the backbone,
   from the activation cache's own count) against the first run's, and the features it trains on against a fresh
   extraction without the store (max abs difference).
4. Warm start: the retrain on B trained with a fresh head and with the champion's head, epochs run (early stopping)
   and best validation accuracy of each.
5. Warm start of fine-tuning: the first run is also fine-tuned and that model is the champion of a second model
   name; the retrain on B fine-tunes (after the same feature extraction) from feature extraction's model and from
   the champion's fine-tuned top and head: epochs run, validation accuracy after the first epoch and at best.

Ends with one JSON line: noop_retrain_seconds, incremental_backbone_ratio, incremental_max_abs_diff,
warm_start_epochs_saved, warm_start_fine_tune_epochs_saved, and the numbers behind them.

    python bench/retrain.py [--per-class 120] [--image-size 96] [--seed 42] [--workdir .bench-retrain]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from tasks import artifacts, storage
from tasks.config import RunConfig, candidate_list

VERSION = "20260101T000000.000Z-000000000001"


def build_folder(source: Path, target: Path, per_class: int, test_per_class: int) -> None:
    """`target/<split>/<class>/` with the first `per_class` train and `test_per_class` test images of each class."""
    from tasks.datasets import scan

    folder = scan(source)
    if target.exists():
        shutil.rmtree(target)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for paths in folder.files[split]:
            for rel in paths[:count]:
                destination = target / rel
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, destination)
    classes = source / "classes.json"
    if classes.is_file():
        shutil.copy2(classes, target / "classes.json")


def run_steps(cfg: RunConfig, train: bool) -> dict:
    from tasks.steps.acquire import acquire
    from tasks.steps.check_changes import check_changes
    from tasks.steps.subsample import subsample
    from tasks.steps.train import train as train_step

    started = time.perf_counter()
    data = subsample(cfg, acquire(cfg))
    changes = check_changes(cfg, data)
    checked = time.perf_counter() - started
    result = {"changes": changes, "check_seconds": round(checked, 2), "data": data}
    if train and changes["train"]:
        (only,) = candidate_list(cfg)
        result["train"] = train_step(cfg, data, dataclasses.asdict(only))
        meta = storage.read_json(storage.join(_candidate(cfg).artifact(artifacts.FEATURES), "meta.json"))
        result["train_backbone_images"] = sum(split["computed"] for split in meta["splits"].values())
    return result


def _candidate(cfg: RunConfig) -> RunConfig:
    """The config of the run's one candidate: its artifacts live under candidates/<slug>/."""
    (only,) = candidate_list(cfg)
    return cfg.for_candidate(only)


def register_champion(cfg: RunConfig, model=artifacts.FEATURE_EXTRACTION_MODEL) -> None:
    """What publish leaves in the registry that retraining reads: manifest, params, model, champion pointer, and
    checksums.json over manifest and params (check_changes reads only records that match it)."""
    import hashlib

    version = storage.join(cfg.publish_uri, cfg.model_name, "versions", VERSION)
    storage.write_json(storage.join(version, "manifest.json"), storage.read_json(cfg.artifact(artifacts.MANIFEST)))
    storage.write_json(storage.join(version, "params.json"), cfg.to_public_dict())
    storage.upload(storage.local_path(_candidate(cfg).artifact(model)), storage.join(version, "model"))
    storage.write_json(storage.join(version, "checksums.json"), {
        name: hashlib.sha256(storage.read_bytes(storage.join(version, name))).hexdigest()
        for name in ("manifest.json", "params.json")})
    storage.write_json(storage.join(cfg.publish_uri, cfg.model_name, "champion.json"), {"version": VERSION})


def fine_tune_run(cfg: RunConfig, steps: dict) -> dict:
    """The fine_tune step after a run's feature extraction, with its per-epoch validation accuracy."""
    from tasks import phases
    from tasks.steps.fine_tune import fine_tune

    tuned = fine_tune(_candidate(cfg), steps["data"], steps["train"])
    curve = [round(float(row["val_accuracy"]), 4) for row in phases.read_history(tuned["history_uri"])]
    return {**tuned, "curve": curve}


def phases_settings(tuned: dict) -> dict:
    """The settings a fine-tune recorded in its summary (the warm start's reason among them)."""
    return storage.read_json(tuned["summary_uri"])["settings"]


def features_diff(cfg: RunConfig, workdir: Path) -> float:
    """Max abs difference between the features the retrain trained on and a fresh extraction without the store."""
    import numpy as np

    from tasks import activation_cache
    from tasks.backbone_split import split_backbone
    from tasks.backbones import load_backbone
    from tasks.training import TRAINING_SPLITS, stage_records

    backbone = load_backbone(cfg.backbone, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
    whole = split_backbone(backbone, 0)
    records = stage_records(cfg, workdir / "fresh-records", TRAINING_SPLITS)
    features = _candidate(cfg).artifact(artifacts.FEATURES)
    fresh = activation_cache.cache_activations(whole.bottom, records, workdir / "fresh", {"fresh": 1},
                                               cfg.batch_size)
    used = activation_cache.open_cache(storage.local_path(features),
                                       storage.read_json(storage.join(features, "meta.json"))["key"],
                                       list(TRAINING_SPLITS))
    return max(float(np.max(np.abs(np.asarray(used[s].activations) - np.asarray(fresh[s].activations))))
               for s in TRAINING_SPLITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=RunConfig.__dataclass_fields__["seed"].default)
    parser.add_argument("--workdir", default=".bench-retrain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    from tasks.datasets import local_dataset

    fashion = local_dataset("idx://fashion_mnist", str(workdir / "cache"))
    new_per_class = max(1, args.per_class // 10)
    build_folder(fashion, workdir / "A", args.per_class, 10)
    build_folder(fashion, workdir / "B", args.per_class + new_per_class, 10)
    base = RunConfig(source=str(workdir / "A"), train_percent=100, test_percent=100, image_size=args.image_size,
                     epochs=args.epochs, patience=3, fine_tune="never", model_name="bench-retrain",
                     publish_uri=str(workdir / "models"), run_root=str(workdir / "runs"),
                     cache_dir=str(workdir / "cache"), warm_start=False, seed=args.seed)
    import os

    os.environ["TLP_FEATURE_STORE"] = str(workdir / "store")

    first = run_steps(dataclasses.replace(base, run_id="first"), train=True)
    register_champion(dataclasses.replace(base, run_id="first"))
    tuned_name = "bench-retrain-fine-tuned"
    first_tuned = fine_tune_run(dataclasses.replace(base, run_id="first", fine_tune_epochs=args.fine_tune_epochs),
                                first)
    register_champion(dataclasses.replace(base, run_id="first", model_name=tuned_name), artifacts.FINE_TUNED_MODEL)
    noop_started = time.perf_counter()
    noop = run_steps(dataclasses.replace(base, run_id="noop"), train=True)
    noop_seconds = time.perf_counter() - noop_started
    assert not noop["changes"]["train"], noop["changes"]

    grown = dataclasses.replace(base, source=str(workdir / "B"))
    fresh_head = run_steps(dataclasses.replace(grown, run_id="grown-fresh"), train=True)
    shift = storage.read_json(fresh_head["changes"]["uri"])
    incremental = shift["embedding_shift"]["backbone_images"] + fresh_head["train_backbone_images"]
    diff = features_diff(dataclasses.replace(grown, run_id="grown-fresh"), workdir)
    warm = run_steps(dataclasses.replace(grown, run_id="grown-warm", warm_start=True), train=True)

    ft = {"fine_tune_epochs": args.fine_tune_epochs}
    fresh_tuned = fine_tune_run(dataclasses.replace(grown, run_id="grown-fresh", **ft), fresh_head)
    warm_top = dataclasses.replace(grown, run_id="grown-warm-top", model_name=tuned_name, warm_start=True,
                                   warm_start_fine_tune=True)
    warm_tuned = fine_tune_run(dataclasses.replace(warm_top, **ft), run_steps(warm_top, train=True))
    warm_top_reason = phases_settings(warm_tuned)["warm_start"]
    assert warm_top_reason.startswith("warm start from champion"), warm_top_reason

    fresh_train, warm_train = fresh_head["train"], warm["train"]
    print(json.dumps({
        "noop_retrain_seconds": round(noop_seconds, 2),
        "noop_reason": noop["changes"]["reason"],
        "first_backbone_images": first["train_backbone_images"],
        "retrain_backbone_images": incremental,
        "incremental_backbone_ratio": round(incremental / first["train_backbone_images"], 4),
        "incremental_max_abs_diff": diff,
        "embedding_shift_auc": shift["embedding_shift"].get("auc"),
        "embedding_shift_noise_band": shift["embedding_shift"].get("noise_band"),
        "prior_shift_p_value": shift["prior_shift"]["p_value"],
        "fresh_head_epochs": fresh_train["epochs_run"], "fresh_head_best_epoch": fresh_train["best_epoch"],
        "fresh_head_val_accuracy": fresh_train["val_accuracy"],
        "warm_start_epochs": warm_train["epochs_run"], "warm_start_best_epoch": warm_train["best_epoch"],
        "warm_start_val_accuracy": warm_train["val_accuracy"],
        "warm_start_epochs_saved": fresh_train["epochs_run"] - warm_train["epochs_run"],
        "first_fine_tune_val_accuracy": first_tuned["val_accuracy"],
        "fine_tune_fresh_epochs": fresh_tuned["epochs_run"], "fine_tune_fresh_curve": fresh_tuned["curve"],
        "fine_tune_fresh_val_accuracy": fresh_tuned["val_accuracy"],
        "fine_tune_fresh_before": fresh_tuned["val_accuracy_before"],
        "fine_tune_warm_epochs": warm_tuned["epochs_run"], "fine_tune_warm_curve": warm_tuned["curve"],
        "fine_tune_warm_val_accuracy": warm_tuned["val_accuracy"],
        "fine_tune_warm_before": warm_tuned["val_accuracy_before"],
        "warm_start_fine_tune_epochs_saved": fresh_tuned["epochs_run"] - warm_tuned["epochs_run"],
        "warm_start_fine_tune_first_epoch_gain": round(warm_tuned["curve"][0] - fresh_tuned["curve"][0], 4),
        "fine_tune_layers": base.fine_tune_layers, "fine_tune_cut": warm_tuned["cut"],
        "per_class": args.per_class, "new_per_class": new_per_class, "image_size": args.image_size,
        "seed": args.seed,
    }))


if __name__ == "__main__":
    main()
