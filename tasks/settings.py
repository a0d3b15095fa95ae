"""Deployment settings: what an operator sets once per Airflow deployment, not per run.

Read from `TLP_*` environment variables in one place, used by the DAG, the UI
plugin, the steps and the dev tools. Per-run choices are trigger-form params
(tasks.config); these are the things a user triggering a run must not move:
where runs and models live, which connection holds the store's keys, limits
on untrusted input, and the promotion policy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "") or default


def _env_number(name: str, default: float, parse: type) -> float:
    """A numeric setting, parsed by `parse` (int or float); a value that does not parse names the variable."""
    value = os.environ.get(name, "")
    try:
        return parse(value) if value else default
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} is not {'an integer' if parse is int else 'a number'}"
                         ) from error


def _env_int(name: str, default: int) -> int:
    return int(_env_number(name, default, int))


def _env_float(name: str, default: float) -> float:
    return float(_env_number(name, default, float))


def _default_run_root() -> str:
    return str(Path(_env("AIRFLOW_HOME", str(Path.home() / "airflow"))) / "tlpipe-runs")


def _limit(env: str, default: int) -> Any:
    """A limit field read from `env`; the variable's name travels with it into error messages."""
    return field(default_factory=lambda: _env_int(env, default), metadata={"env": env})


@dataclass(frozen=True)
class Limits:
    """Bounds on untrusted input, checked before the work they would cost is done."""

    max_download_bytes: int = _limit("TLP_MAX_DOWNLOAD_BYTES", 20 * 2**30)
    max_archive_bytes: int = _limit("TLP_MAX_ARCHIVE_BYTES", 50 * 2**30)
    max_archive_members: int = _limit("TLP_MAX_ARCHIVE_MEMBERS", 250_000)
    # uncompressed / compressed bytes, per zip member and over a whole tar stream: a zip bomb is ~1000
    max_compression_ratio: int = _limit("TLP_MAX_COMPRESSION_RATIO", 100)
    # what must stay free on the cache's disk after an extraction or a download
    min_free_bytes: int = _limit("TLP_MIN_FREE_BYTES", 2**30)
    max_image_pixels: int = _limit("TLP_MAX_IMAGE_PIXELS", 64 * 2**20)
    max_image_bytes: int = _limit("TLP_MAX_IMAGE_BYTES", 64 * 2**20)

    def exceeded(self, name: str, value: int) -> str:
        """"" when `value` is within the limit `name`; else a clause naming the limit and how to raise it."""
        limit = getattr(self, name)
        if value <= limit:
            return ""
        env = next(item.metadata["env"] for item in fields(self) if item.name == name)
        return (f"above the limit of {limit:,} ({env}); use smaller input, or have the deployment raise "
                f"{env} if this input is trusted")


@dataclass(frozen=True)
class Settings:
    """The deployment's settings, read from the environment when built."""

    run_root: str = field(default_factory=lambda: _env("TLP_RUN_ROOT", _default_run_root()))
    publish_uri: str = field(default_factory=lambda: _env("TLP_PUBLISH_URI", "s3://models"))
    # publish locations the registry page may read (the default publish_uri is always one)
    publish_locations: tuple[str, ...] = field(default_factory=lambda: tuple(
        uri.strip() for uri in _env("TLP_PUBLISH_LOCATIONS", "").split(",") if uri.strip()))
    model_store_conn_id: str = field(default_factory=lambda: _env("TLP_MODEL_STORE_CONN_ID", "model_store"))
    cache_dir: str = field(default_factory=lambda: _env("TLP_CACHE_DIR", str(Path.home() / ".cache" / "tlpipe")))
    retrain_schedule: str = field(default_factory=lambda: _env("TLP_RETRAIN_SCHEDULE", "0 3 * * 1"))
    retrain_params_variable: str = "tlp_retrain_params"
    # heavy steps can go to a GPU worker: `airflow celery worker -q gpu` and TLP_TRAIN_QUEUE=gpu
    train_queue: str = field(default_factory=lambda: _env("TLP_TRAIN_QUEUE", "default"))
    # promotion policy: a candidate replaces the champion only above the floor and by at least the gain
    min_accuracy: float = field(default_factory=lambda: _env_float("TLP_MIN_ACCURACY", 0.0))
    promotion_margin: float = field(default_factory=lambda: _env_float("TLP_PROMOTION_MARGIN", 0.0))
    # human approval before promotion, per DAG: e.g. TLP_APPROVAL_DAGS=transfer_learning_retrain
    approval_dags: tuple[str, ...] = field(default_factory=lambda: tuple(
        dag.strip() for dag in _env("TLP_APPROVAL_DAGS", "").split(",") if dag.strip()))
    approval_timeout_hours: float = field(default_factory=lambda: _env_float("TLP_APPROVAL_TIMEOUT_HOURS", 24.0))
    limits: Limits = field(default_factory=Limits)
    # SavedModel backbones are code that runs on the workers: only these local folders and s3:// prefixes may
    # hold one ("*" = anywhere: a single-user deployment only), and TF Hub handles only when allowed
    backbone_locations: tuple[str, ...] = field(default_factory=lambda: tuple(
        uri.strip() for uri in _env("TLP_BACKBONE_LOCATIONS", "").split(",") if uri.strip()))
    allow_hub_backbones: bool = field(default_factory=lambda: _env("TLP_ALLOW_HUB_BACKBONES", "false").lower()
                                      in ("1", "true", "yes"))
    # retraining (tasks.feature_store, tasks.data_changes): the shared feature store, its size cap, and the
    # embedding shift (domain-classifier AUC since the champion) above which promotion waits for a human (0 = off)
    feature_store: str = field(default_factory=lambda: _env("TLP_FEATURE_STORE", ""))
    feature_store_max_bytes: int = field(default_factory=lambda: _env_int("TLP_FEATURE_STORE_MAX_BYTES", 20 * 2**30))
    shift_auc_threshold: float = field(default_factory=lambda: _env_float("TLP_SHIFT_AUC_THRESHOLD", 0.0))
    # the retrain DAG's data asset: an s3:// prefix whose new or changed objects start a retrain, polled this often
    retrain_watch_uri: str = field(default_factory=lambda: _env("TLP_RETRAIN_WATCH_URI", ""))
    retrain_watch_interval_s: float = field(default_factory=lambda: _env_float("TLP_RETRAIN_WATCH_INTERVAL_S", 60.0))

    def feature_store_root(self) -> str:
        """Where backbone features shared by runs live: TLP_FEATURE_STORE, else `_feature_store` under the run root."""
        from tasks import storage

        return self.feature_store or storage.join(self.run_root, "_feature_store")

    def feature_store_args(self) -> tuple[str, int]:
        """(root, size cap in bytes) of the feature store: tasks.feature_store.FeatureStore's arguments."""
        return self.feature_store_root(), self.feature_store_max_bytes

    def readable_publish_locations(self) -> tuple[str, ...]:
        """Where published models may be read from by the UI: the configured ones plus the default."""
        return tuple(dict.fromkeys((self.publish_uri, *self.publish_locations)))


def load() -> Settings:
    """The settings of this process's environment (read anew: tests and tools change it)."""
    return Settings()
