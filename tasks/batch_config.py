"""The params of the batch-scoring DAG (`batch_predict`), each declared once, like tasks/config.py for training.

`BatchConfig` fields declared with `param(...)` are the trigger form: the DAG
builds its `Param`s from `param_specs` and every task rebuilds and re-validates
the config from them. Optional params are nullable (`None` = the default the
description names), so Airflow's trigger form submits with its defaults.
Locations are never taken on trust: the model is read only from one of the
deployment's publish locations, and predictions are written only to one of its
prediction locations (tasks.settings).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from tasks import config, settings, storage
from tasks.config import MODEL_NAME_PATTERN, RunConfig, check_value, param, safe_name
from tasks.errors import ConfigError

VERSION_PATTERN = r"^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{12}$"  # tasks/steps/publish.py version ids
MAX_SHARDS = 1024  # Airflow's [core] max_map_length
IMAGES, MODEL, OUTPUT = "Images", "Model", "Output"  # the trigger form's sections


@dataclass(frozen=True)
class BatchConfig:
    """What one batch-scoring run scores, with which model, and where the predictions go."""

    images: str = param("", "Images to score", "A local folder or file:// URI, an s3://bucket/prefix/, or an "
                        "archive (http(s)://, s3:// or local .zip / .tar.gz). Every image below it is scored; "
                        "files that cannot be decoded are listed in the summary.", IMAGES, type="string", minLength=1)
    model_name: str = param(RunConfig.model_name, "Model name", "The published model to score with.",
                            MODEL, type="string", pattern=MODEL_NAME_PATTERN)
    model_version: str | None = param(None, "Model version", "Empty = the model's current champion; or a "
                                      "published version id (e.g. 20261122T081500.123Z-3fa2b1c9d0e4).",
                                      MODEL, optional=True, type="string", pattern=f"({VERSION_PATTERN})|^$")
    publish_uri: str | None = param(None, "Model registry", "Empty = the deployment's TLP_PUBLISH_URI; or one "
                                    "of its other publish locations (TLP_PUBLISH_LOCATIONS).",
                                    MODEL, optional=True, type="string")
    predictions_uri: str | None = param(None, "Write predictions to", "Empty = the deployment's "
                                        "TLP_PREDICTIONS_URI; or one of its TLP_PREDICTION_LOCATIONS.",
                                        OUTPUT, optional=True, type="string")
    shard_size: int = param(1000, "Images per shard", "Each shard is scored by its own mapped task (on the "
                            "score queue); finished shards are reused by later runs on the same images and model.",
                            IMAGES, type="integer", minimum=1, maximum=100_000)
    top_k: int = param(3, "Top-k", "Labels and probabilities kept per image.", OUTPUT, type="integer", minimum=1,
                       maximum=100)
    gallery_size: int = param(48, "Gallery size", "Least confident predictions shown in the UI.",
                              OUTPUT, type="integer", minimum=0, maximum=1000)
    # filled in by the DAG from the run's context and the deployment settings, not params
    run_root: str = field(default_factory=lambda: settings.load().run_root)
    dag_id: str = "batch_predict"
    run_id: str = "manual"
    cache_dir: str = field(default_factory=lambda: settings.load().cache_dir)

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            if "param" in spec.metadata:
                if getattr(self, spec.name) == "" and _nullable(spec.metadata["param"]):
                    object.__setattr__(self, spec.name, None)
                check_value(spec.name, getattr(self, spec.name), spec.metadata["param"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.dag_id):
            raise ConfigError(f"dag_id={self.dag_id!r} is invalid: give the Airflow dag_id")
        if not self.run_id:
            raise ConfigError("run_id='' is invalid: give the Airflow run_id or any non-empty name")

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "BatchConfig":
        """Build from DAG params (Airflow passes its own keys too: only config fields are taken)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**params, **overrides}.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values for XCom; `cache_dir` is the worker's own, so it is left out."""
        values = dataclasses.asdict(self)
        del values["cache_dir"]
        return values

    @property
    def registry(self) -> str:
        """The publish location the model is read from."""
        return self.publish_uri or settings.load().publish_uri

    @property
    def output_root(self) -> str:
        """Where this model's predictions go: `<predictions location>/<model name>`."""
        return storage.join(self.predictions_uri or settings.load().predictions_uri, self.model_name)

    @property
    def run_uri(self) -> str:
        """This run's folder under the run root (the UI plugin derives the same from dag and run id)."""
        return run_uri(self.run_root, self.dag_id, self.run_id)

    def artifact(self, artifact, *below: str) -> str:
        """URI of a catalogued run-root artifact (tasks.artifacts) of this run."""
        return storage.join(self.run_uri, *artifact.parts, *below)

    def check_locations(self, deployment: settings.Settings) -> None:
        """The registry and the predictions location must be the deployment's own (a conf is user input)."""
        _check_location("publish_uri", self.registry, deployment.readable_publish_locations(),
                        "TLP_PUBLISH_LOCATIONS")
        _check_location("predictions_uri", self.predictions_uri or deployment.predictions_uri,
                        deployment.writable_prediction_locations(), "TLP_PREDICTION_LOCATIONS")


def param_specs() -> dict[str, tuple[Any, dict[str, Any]]]:
    """{param name: (default, JSON schema with title and description)}: what the trigger form is built from."""
    return {spec.name: (spec.default, dict(spec.metadata["param"]))
            for spec in dataclasses.fields(BatchConfig) if "param" in spec.metadata}


def run_uri(run_root: str, dag_id: str, run_id: str) -> str:
    """A run's folder under the run root, `<run_root>/<dag_id>/<run id as one safe segment>`."""
    return storage.join(run_root, dag_id, safe_name(run_id))


def check_conf(conf: dict[str, Any]) -> None:
    """Refuse trigger-conf keys that are not params of this DAG, naming the closest param."""
    config.check_conf(conf, params=param_specs())


def _nullable(schema: dict[str, Any]) -> bool:
    return isinstance(schema.get("type"), list) and "null" in schema["type"]


def _check_location(name: str, uri: str, allowed: tuple[str, ...], env: str) -> None:
    if uri.rstrip("/") not in {location.rstrip("/") for location in allowed}:
        raise ConfigError(f"{name}={uri!r} is not one of this deployment's locations; use one of {list(allowed)} "
                          f"(an operator adds locations with {env})")
