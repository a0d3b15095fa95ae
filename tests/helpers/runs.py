"""Tiny runs: image folders, a run root as subsample leaves it, what steps hand each other, DAG params."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tasks import artifacts, records, storage
from tasks.config import RunConfig, candidate_list
from tasks.phases import FEATURE_EXTRACTION, PhaseSummary

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def write_image_folder(root: Path, classes: dict[str, int], splits=("train", "test"), size: int = 32,
                       seed: int = 0) -> Path:
    """A `root/<split>/<class>/<n>.jpg` folder of small random JPEGs, each class its own hue."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for index, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(index * 80) % 256, (index * 150) % 256, (index * 40) % 256], dtype=np.int16)
            for n in range(count):
                noise = rng.integers(-30, 30, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n:04d}.jpg", quality=90)
    return root


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def examples(per_class: int, seed: int) -> list[tuple[bytes, int, str]]:
    """Noisy 16 px squares, one dominant colour per class: learnable from ImageNet features in a few epochs."""
    rng = np.random.default_rng(seed)
    found = []
    for label, (name, colour) in enumerate(COLOURS.items()):
        for n in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-50, 50, (16, 16, 3)), 0, 255).astype(np.uint8)
            found.append((_png(pixels), label, f"{name}/{n}.png"))
    return found


def tiny_run(run_root: str, cache_dir: str, per_class: int = 16, **overrides) -> RunConfig:
    """A run root as subsample leaves it: train/val/test records and a manifest; returns the config of its one
    candidate (artifacts under candidates/<slug>/, as the DAG's steps see them).

    EfficientNet-Lite0 (the offline ImageNet backbone) at 32 px keeps every step to seconds.
    """
    values = dict(run_root=run_root, run_id="run-1", backbone="efficientnet_lite0", backbone_weights="imagenet",
                  image_size=32, batch_size=8, epochs=3, cache_dir=cache_dir)
    cfg = RunConfig(**{**values, **overrides})
    cfg = cfg.for_candidate(candidate_list(cfg)[0])
    scratch = Path(cache_dir) / "records"
    for split, count, seed in (("train", per_class, 0), ("val", max(per_class // 4, 2), 1), ("test", 4, 2)):
        local = scratch / f"{split}.tfrecord"
        records.write_records(local, examples(count, seed))
        storage.upload(local, cfg.artifact(artifacts.split_records(split)))
    counts = {"train": per_class, "val": max(per_class // 4, 2), "test": 4}
    storage.write_json(cfg.artifact(artifacts.MANIFEST), {"classes": list(COLOURS), "hash": "tiny", "counts": {
        split: {name: count for name in COLOURS} for split, count in counts.items()}, "image_sizes": {
        split: {"images": count * len(COLOURS), "short_side": {"median": 16.0}} for split, count in counts.items()}})
    return cfg


def subsampled(cfg: RunConfig) -> dict:
    """What subsample hands the later steps for a tiny_run."""
    return {"manifest": cfg.artifact(artifacts.MANIFEST), "hash": "tiny"}


def candidate(cfg: RunConfig) -> dict:
    """The candidate dict the DAG maps train over, for cfg's candidate."""
    return {"backbone": cfg.backbone, "image_size": cfg.image_size, "slug": cfg.candidate}


def selected(cfg: RunConfig) -> dict:
    """What select hands on when cfg's candidate (trained) wins: where its model, history and summary are, and the
    boundary activations its pass left, if any."""
    boundary = cfg.artifact(artifacts.BOUNDARY)
    return {"candidate": cfg.candidate, "backbone": cfg.backbone, "image_size": cfg.image_size,
            "model_uri": cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL),
            "history_uri": cfg.artifact(artifacts.HISTORY), "summary_uri": cfg.artifact(artifacts.TRAIN_SUMMARY),
            "leaderboard_uri": cfg.artifact(artifacts.LEADERBOARD),
            **({"boundary_uri": boundary} if storage.exists(boundary) else {})}


def metrics_of(history: dict) -> np.ndarray:
    return np.array([[entry[key] for key in METRICS] for entry in history["epochs"]])


def phase_summary(**values) -> PhaseSummary:
    """A feature-extraction summary as train writes it; `values` override its fields."""
    defaults = dict(phase=FEATURE_EXTRACTION, backbone="efficientnet_lite0", weights_source="imagenet",
                    feature_dim=1280, manifest_hash="h", epochs=3, seconds=10.0, best_epoch=3, best_val_accuracy=0.8,
                    stopped_early=False, resumed_from_epoch=None, settings={"augment": False})
    return PhaseSummary(**{**defaults, **values})


def deployment_env(run_root: str, publish_uri: str) -> dict[str, str]:
    """The deployment settings a test run needs: where runs live, the publish location it may use, and a minimum
    test size a tiny run meets (its first model may become champion)."""
    return {"TLP_RUN_ROOT": run_root, "TLP_PUBLISH_LOCATIONS": publish_uri, "TLP_MIN_TEST_IMAGES": "1"}


def tiny_conf(tmp_path: Path, fine_tune: str, publish_uri: str) -> dict:
    """DAG params for a whole run in about a minute: 3 easy classes, 32 px, the real Lite0 backbone."""
    source = write_image_folder(tmp_path / "images", {"dark": 16, "mid": 16, "light": 16}, splits=("train", "test"))
    return {
        "source": str(source), "train_percent": 100, "val_fraction": 0.25, "backbone": "efficientnet_lite0",
        "image_size": 32, "batch_size": 16, "epochs": 2, "patience": 1, "fine_tune": fine_tune,
        "fine_tune_layers": 5, "fine_tune_epochs": 1, "top_k_wrong": 5, "model_name": "tiny-model",
        "publish_uri": publish_uri,
    }
