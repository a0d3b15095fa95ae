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


def _list(name: str) -> tuple[str, ...]:
    """A comma-separated setting, blanks dropped."""
    return tuple(item.strip() for item in _env(name, "").split(",") if item.strip())


def _pairs(name: str) -> tuple[tuple[str, str], ...]:
    """A comma-separated `key=value` setting; an entry without `=` names the variable and the form."""
    pairs = []
    for item in _list(name):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"environment variable {name}: {item!r} is not of the form model=uri")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _approval_models() -> tuple[str, ...]:
    if _list("TLP_APPROVAL_DAGS"):
        raise ValueError("TLP_APPROVAL_DAGS is no longer read: approval is per model now. Set TLP_APPROVAL_MODELS to "
                         "the model names (or <publish_uri>/<model> roots, or *) whose promotions need approval, and "
                         "TLP_APPROVERS to who may approve")
    return _list("TLP_APPROVAL_MODELS")


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
    # promotion policy (tasks.promotion): a candidate replaces the champion only when, judged on test images it did
    # not choose, it reaches the floor, on at least the minimum test size, and beats the champion on the same
    # images by at least the minimum effect with a paired test below alpha
    min_accuracy: float = field(default_factory=lambda: _env_float("TLP_MIN_ACCURACY", 0.0))
    promotion_margin: float = field(default_factory=lambda: _env_float("TLP_PROMOTION_MARGIN", 0.01))
    promotion_alpha: float = field(default_factory=lambda: _env_float("TLP_PROMOTION_ALPHA", 0.05))
    min_test_images: int = field(default_factory=lambda: _env_int("TLP_MIN_TEST_IMAGES", 1000))
    # deployment-owned evaluation sets, per model: `model=uri` pairs, each an image folder `<class>/<image>`
    evaluation_sets: tuple[tuple[str, str], ...] = field(default_factory=lambda: _pairs("TLP_EVALUATION_SETS"))
    # human approval before promotion, per model: model names or `<publish_uri>/<model>` roots, `*` for all
    approval_models: tuple[str, ...] = field(default_factory=lambda: _approval_models())
    # who may answer an approval request (Airflow user ids; the user who triggered the run never may)
    approvers: tuple[str, ...] = field(default_factory=lambda: _list("TLP_APPROVERS"))
    approval_timeout_hours: float = field(default_factory=lambda: _env_float("TLP_APPROVAL_TIMEOUT_HOURS", 24.0))
    # how long a run may take besides waiting for approval; the DAG's run timeout adds the approval timeout
    run_timeout_hours: float = field(default_factory=lambda: _env_float("TLP_RUN_TIMEOUT_HOURS", 8.0))
    # attempts per S3 call (botocore's standard retry mode) before a StoreUnavailableError
    s3_retry_attempts: int = field(default_factory=lambda: _env_int("TLP_S3_RETRY_ATTEMPTS", 5))
    # the model the registry page shows when none is named ("" = the trigger form's default model_name)
    ui_model_name: str = field(default_factory=lambda: _env("TLP_MODEL_NAME", ""))
    # dev tools: the demo's UI port and admin password; a worker's name when several share one machine
    ui_port: int = field(default_factory=lambda: _env_int("TLP_UI_PORT", 8080))
    ui_password: str = field(default_factory=lambda: _env("TLP_UI_PASSWORD", "admin"))
    worker_name: str = field(default_factory=lambda: _env("TLP_WORKER_NAME", ""))
    limits: Limits = field(default_factory=Limits)
    # batch scoring (dags/batch_predict.py): where predictions go by default, the other places they may go, the
    # queue of the scoring tasks (a GPU worker can take them) and how many shards of one run score at once
    predictions_uri: str = field(default_factory=lambda: _env("TLP_PREDICTIONS_URI", _env(
        "TLP_RUN_ROOT", _default_run_root()).rstrip("/") + "-predictions"))
    prediction_locations: tuple[str, ...] = field(default_factory=lambda: tuple(
        uri.strip() for uri in _env("TLP_PREDICTION_LOCATIONS", "").split(",") if uri.strip()))
    score_queue: str = field(default_factory=lambda: _env("TLP_SCORE_QUEUE", _env("TLP_TRAIN_QUEUE", "default")))
    score_parallelism: int = field(default_factory=lambda: _env_int("TLP_SCORE_PARALLELISM", 4))
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

    def __post_init__(self) -> None:
        if self.approval_models and not self.approvers:
            raise ValueError(f"TLP_APPROVAL_MODELS={','.join(self.approval_models)} asks for approval but "
                             "TLP_APPROVERS names nobody who may give it: set TLP_APPROVERS to the approvers' Airflow "
                             "user ids")

    def approval_required(self, publish_uri: str, model_name: str) -> bool:
        """Whether promoting `model_name` at `publish_uri` waits for a human (TLP_APPROVAL_MODELS)."""
        root = f"{publish_uri.rstrip('/')}/{model_name}"
        return any(entry in ("*", model_name) or entry.rstrip("/") == root for entry in self.approval_models)

    def evaluation_set(self, model_name: str) -> str | None:
        """The deployment's own evaluation set for a model (TLP_EVALUATION_SETS), if it has one."""
        return dict(self.evaluation_sets).get(model_name)

    def readable_publish_locations(self) -> tuple[str, ...]:
        """Where published models may be read from by the UI: the configured ones plus the default."""
        return tuple(dict.fromkeys((self.publish_uri, *self.publish_locations)))

    def writable_prediction_locations(self) -> tuple[str, ...]:
        """Where a batch-scoring run may write its predictions: the configured ones plus the default."""
        return tuple(dict.fromkeys((self.predictions_uri, *self.prediction_locations)))


def load() -> Settings:
    """The settings of this process's environment (read anew: tests and tools change it)."""
    return Settings()
