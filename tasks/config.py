"""The one run configuration every step takes.

Built and validated once (from DAG params, a CLI, or a test) so that steps never
re-parse loose dicts and a bad value fails before any work starts, naming the
parameter and what to do about it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.artifacts import Artifact

FineTuneMode = Literal["auto", "always", "never"]
FINE_TUNE_MODES = ("auto", "always", "never")
DEFAULT_CACHE_DIR = Path(os.environ.get("TLP_CACHE_DIR", Path.home() / ".cache" / "tlpipe"))



def parse_classes(value: str | int | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | int | None:
    """Normalise the `classes` param: None/"" = all, an int or "3" = first N, else names.

    Names come as a list or a comma-separated string ("pizza, steak").
    """
    if value is None or value == "" or value == [] or value == ():
        return None
    if isinstance(value, bool):
        raise ConfigError("classes: expected class names or a number of classes, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        names = [part.strip() for part in text.split(",")]
    else:
        names = [str(part).strip() for part in value]
    names = [name for name in names if name]
    if len(set(names)) != len(names):
        raise ConfigError(f"classes: {names} lists a class twice; list each class once")
    return tuple(names) or None


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline run needs to know, with the offline demo as defaults."""

    # data
    source: str = "idx://fashion_mnist"
    source_sha256: str = ""
    classes: tuple[str, ...] | int | None = None
    train_percent: float = 10.0
    train_count: int = 0
    val_fraction: float = 0.1
    test_percent: float = 100.0
    seed: int = 42
    # model
    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "imagenet"
    image_size: int = 96
    batch_size: int = 64
    dropout: float = 0.2
    # feature extraction
    epochs: int = 10
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    loss: str = "sparse_categorical_crossentropy"
    augment: bool = False
    patience: int = 3
    min_delta: float = 0.005
    # fine-tuning
    fine_tune: FineTuneMode = "auto"
    target_accuracy: float | None = 0.95
    fine_tune_layers: int = 20
    fine_tune_epochs: int = 5
    fine_tune_lr_factor: float = 0.1
    # evaluation and publishing
    top_k: int = 5
    top_k_wrong: int = 50
    model_name: str = "fashion-mnist-classifier"
    publish_uri: str = "s3://models"
    promotion_margin: float = 0.0
    force_promote: bool = False
    # where artifacts go
    run_root: str = ".runs"
    run_id: str = "manual"
    cache_dir: str = field(default_factory=lambda: str(DEFAULT_CACHE_DIR))

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", parse_classes(self.classes))
        _check(0 < self.train_percent <= 100, "train_percent", self.train_percent, "use a value in (0, 100]")
        _check(self.train_count >= 0, "train_count", self.train_count, "use 0 (use train_percent) or a positive count")
        _check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "use a value in (0, 1)")
        _check(0 < self.test_percent <= 100, "test_percent", self.test_percent, "use a value in (0, 100]")
        _check(self.seed >= 0, "seed", self.seed, "use a non-negative integer")
        _check(32 <= self.image_size <= 1024, "image_size", self.image_size, "use 32..1024 pixels")
        _check(bool(self.backbone_weights), "backbone_weights", self.backbone_weights,
               "use 'imagenet', 'none', or a path/s3:// URI of a weights file")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "use a positive batch size")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "use a value in [0, 1)")
        _check(self.epochs >= 1, "epochs", self.epochs, "use at least 1 epoch")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "use a positive learning rate")
        _check(self.patience >= 1, "patience", self.patience, "use at least 1 epoch")
        _check(self.min_delta >= 0, "min_delta", self.min_delta, "use a non-negative improvement threshold")
        _check(self.fine_tune in FINE_TUNE_MODES, "fine_tune", self.fine_tune, f"use one of {FINE_TUNE_MODES}")
        _check(self.target_accuracy is None or 0 < self.target_accuracy <= 1, "target_accuracy",
               self.target_accuracy, "use a value in (0, 1], or None for no target")
        _check(self.fine_tune_layers >= 1, "fine_tune_layers", self.fine_tune_layers, "unfreeze at least 1 layer")
        _check(self.fine_tune_epochs >= 1, "fine_tune_epochs", self.fine_tune_epochs, "use at least 1 epoch")
        _check(0 < self.fine_tune_lr_factor <= 1, "fine_tune_lr_factor", self.fine_tune_lr_factor,
               "use a factor in (0, 1]: fine-tuning must not raise the learning rate")
        _check(self.top_k >= 1, "top_k", self.top_k, "use at least 1")
        _check(self.top_k_wrong >= 1, "top_k_wrong", self.top_k_wrong, "use at least 1")
        _check(bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", self.model_name)), "model_name", self.model_name,
               "use lowercase letters, digits, '.', '_' or '-' (it becomes part of an S3 key)")
        _check(self.promotion_margin >= 0, "promotion_margin", self.promotion_margin, "use a non-negative margin")
        _check(bool(self.run_root), "run_root", self.run_root, "give a local directory or an s3:// URI")
        _check(bool(self.run_id), "run_id", self.run_id, "give the Airflow run_id or any non-empty name")

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "RunConfig":
        """Build from DAG params, ignoring keys that are not config fields (e.g. Airflow's own)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in {**params, **overrides}.items() if k in names}
        if values.get("target_accuracy") in (0, 0.0):
            values["target_accuracy"] = None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able params, e.g. for XCom, params.json and the model card.

        `cache_dir` is left out: it is a path on the machine that runs a step, so a
        config handed to another worker must use that worker's own cache.
        """
        values = dataclasses.asdict(self)
        del values["cache_dir"]
        if isinstance(self.classes, tuple):
            values["classes"] = list(self.classes)
        return values

    @property
    def run_uri(self) -> str:
        """The run root of this run: every artifact of the run lives below it."""
        from tasks import storage

        return storage.join(self.run_root, safe_name(self.run_id))

    def artifact(self, artifact: "Artifact", *below: str) -> str:
        """URI of a catalogued artifact of this run (or of a file below it), e.g. `cfg.artifact(artifacts.MANIFEST)`."""
        from tasks import storage

        return storage.join(self.run_uri, *artifact.parts, *below)


def safe_name(run_id: str) -> str:
    """A run_id as one path/key segment: Airflow run ids contain ':' and '+'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")
