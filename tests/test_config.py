"""RunConfig validates params once and names the bad one."""
from __future__ import annotations

import pytest

from tasks import artifacts
from tasks.config import ConfigError, RunConfig, parse_classes, safe_name


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), (3, 3), ("3", 3), ("pizza, steak", ("pizza", "steak")),
    (["pizza", "steak"], ("pizza", "steak")), ("T-shirt/top", ("T-shirt/top",)),
])
def test_classes_param_forms(value, expected):
    assert parse_classes(value) == expected


@pytest.mark.parametrize("field, value", [
    ("train_percent", 0), ("train_percent", 101), ("val_fraction", 1.0), ("image_size", 8), ("epochs", 0),
    ("fine_tune", "sometimes"), ("seed", -1), ("fine_tune_lr_factor", 2.0), ("model_name", "Has Spaces"), ("classes", "a,a"),
])
def test_invalid_values_are_rejected_naming_the_param(field, value):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{field: value})


def test_from_params_ignores_foreign_keys_and_maps_zero_target_to_none():
    cfg = RunConfig.from_params({"epochs": 2, "target_accuracy": 0, "airflow_thing": 1}, run_id="r")
    assert cfg.epochs == 2 and cfg.target_accuracy is None and cfg.run_id == "r"


def test_artifacts_are_keyed_by_a_path_safe_run_id():
    cfg = RunConfig(run_root="s3://bucket/runs", run_id="manual__2026-11-22T08:00:00+00:00")
    assert cfg.artifact(artifacts.MANIFEST) == (
        "s3://bucket/runs/manual__2026-11-22T08_00_00_00_00/data/manifest.json")
    assert safe_name("a/b:c") == "a_b_c"


def test_to_dict_is_json_ready_and_leaves_the_machine_local_cache_out():
    import json

    cfg = RunConfig(classes="a,b", cache_dir="/worker-a/cache")
    values = json.loads(json.dumps(cfg.to_dict()))
    assert values["classes"] == ["a", "b"]
    assert "cache_dir" not in values
    assert RunConfig.from_params(values).cache_dir != "/worker-a/cache"
