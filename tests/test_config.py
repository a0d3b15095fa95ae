"""RunConfig validates params once and names the bad one."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks import artifacts
from tasks.config import (
    RunConfig,
    candidate_list,
    check_conf,
    check_publish_location,
    param_specs,
    parse_classes,
    safe_name,
)
from tasks.errors import ConfigError

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), (3, 3), ("3", 3), ("pizza, steak", ("pizza", "steak")),
    (["pizza", "steak"], ("pizza", "steak")), ("T-shirt/top", ("T-shirt/top",)),
])
def test_classes_param_forms(value, expected):
    assert parse_classes(value) == expected


@pytest.mark.parametrize("field, value", [
    ("train_percent", 0), ("train_percent", 101), ("val_fraction", 1.0), ("image_size", 8), ("epochs", 0),
    ("fine_tune", "sometimes"), ("fine_tune_depthwise", "maybe"), ("seed", -1), ("fine_tune_lr_factor", 2.0),
    ("model_name", "Has Spaces"),
    ("classes", "a,a"),
])
def test_invalid_values_are_rejected_naming_the_param(field, value):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{field: value})


def test_from_params_ignores_foreign_keys_and_maps_zero_target_to_none():
    cfg = RunConfig.from_params({"epochs": 2, "target_accuracy": 0, "airflow_thing": 1}, run_id="r")
    assert cfg.epochs == 2 and cfg.target_accuracy is None and cfg.run_id == "r"


def test_run_folder_is_dag_id_then_the_run_id_as_one_encoded_segment():
    cfg = RunConfig(run_root="s3://bucket/runs", dag_id="transfer_learning",
                    run_id="manual__2026-11-22T08:00:00+00:00")
    assert cfg.artifact(artifacts.MANIFEST) == (
        "s3://bucket/runs/transfer_learning/manual__2026-11-22T08%3A00%3A00%2B00%3A00/data/manifest.json")


@pytest.mark.parametrize("run_id", ["..", ".", "../../etc", "a/../../b", "/abs", "~root"])
def test_hostile_run_ids_stay_one_segment_inside_the_run_root(tmp_path, run_id):
    cfg = RunConfig(run_root=str(tmp_path / "runs"), dag_id="d", run_id=run_id)
    folder = Path(cfg.run_uri)
    assert folder.parent == tmp_path / "runs" / "d"
    assert folder.name not in (".", "..") and "/" not in safe_name(run_id)
    assert folder.resolve().is_relative_to((tmp_path / "runs" / "d").resolve())


def test_distinct_run_ids_and_dags_never_share_a_folder():
    ids = ["a:b", "a+b", "a_b", "a.b", "a%3Ab", "a b", "a/b"]
    assert len({safe_name(run_id) for run_id in ids}) == len(ids)
    manual = RunConfig(run_root="/r", dag_id="transfer_learning", run_id="x")
    retrain = RunConfig(run_root="/r", dag_id="transfer_learning_retrain", run_id="x")
    assert manual.run_uri != retrain.run_uri


def test_every_param_rule_comes_from_the_field_metadata():
    specs = param_specs(RunConfig())
    assert {"backbone_weights", "source_sha256", "train_count", "test_percent", "dropout"} <= set(specs)
    assert not {"run_id", "run_root", "dag_id", "cache_dir", "force_promote", "promotion_margin"} & set(specs)
    default, schema = specs["epochs"]
    assert default == 10 and schema["maximum"] == 500 and schema["title"] and schema["description"]
    with pytest.raises(ConfigError, match="epochs"):
        RunConfig(epochs=501)  # the same bound the form shows
    with pytest.raises(ConfigError, match="model_name"):
        RunConfig(model_name="x" * 64)


def test_undeclared_conf_keys_are_refused_naming_them_and_the_likely_param():
    check_conf({"epochs": 3, "fine_tune": "never"})
    with pytest.raises(ConfigError, match=r"'force_promote'.*not a param"):
        check_conf({"force_promote": True})
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        check_conf({"epoch": 3})


def test_publish_uri_must_be_a_configured_publish_location():
    check_publish_location(RunConfig(publish_uri="s3://models/"), ("s3://models",))
    with pytest.raises(ConfigError, match="publish_uri='s3://elsewhere'.*TLP_PUBLISH_LOCATIONS"):
        check_publish_location(RunConfig(publish_uri="s3://elsewhere"), ("s3://models",))


def test_to_dict_is_json_ready_and_leaves_the_machine_local_cache_out():
    import json

    cfg = RunConfig(classes="a,b", cache_dir="/worker-a/cache")
    values = json.loads(json.dumps(cfg.to_dict()))
    assert values["classes"] == ["a", "b"]
    assert "cache_dir" not in values
    assert RunConfig.from_params(values).cache_dir != "/worker-a/cache"


def test_public_params_carry_no_credentials_of_source_urls():
    cfg = RunConfig(source="https://user:hunter2@data.example/food.zip?X-Amz-Signature=f00d",
                    backbone_weights="s3://bucket/w.weights.h5")
    public = cfg.to_public_dict()
    assert "hunter2" not in str(public) and "f00d" not in str(public)
    assert cfg.to_dict()["source"] == cfg.source  # XCom keeps what the next task must fetch


def _form_marks_missing(default, schema) -> bool:
    """Airflow 3.3's trigger form rule (ui: FlexibleForm): a param whose type lacks "null" is required, and
    None or "" in a required field is missing (red mark, Trigger disabled)."""
    kind = schema.get("type")
    required = bool(kind) and not (isinstance(kind, list) and "null" in kind)
    return required and default in (None, "")


def test_the_trigger_form_submits_with_its_defaults():
    specs = param_specs(RunConfig())
    assert [name for name, (default, schema) in specs.items() if _form_marks_missing(default, schema)] == []
    RunConfig.from_params({name: default for name, (default, _) in specs.items()})  # and the defaults validate


@pytest.mark.parametrize("name", ["source_sha256", "classes", "candidates"])
@pytest.mark.parametrize("empty", [None, ""])
def test_an_optional_param_left_empty_means_its_default(name, empty):
    default, schema = param_specs(RunConfig())[name]
    assert "null" in schema["type"] and default is None
    cfg = RunConfig.from_params({name: empty})
    assert getattr(cfg, name) == getattr(RunConfig(), name)


def test_a_required_param_is_not_optional_to_the_checks_either():
    _, schema = param_specs(RunConfig())["backbone"]
    assert "null" not in schema["type"]
    with pytest.raises(ConfigError, match="backbone=None is invalid: expected a string"):
        RunConfig(backbone=None)
    with pytest.raises(ConfigError, match="source_sha256='abc' is invalid"):
        RunConfig(source_sha256="abc")  # optional, but a given value is still checked


def test_params_come_in_sections_with_the_rare_ones_last():
    from tasks.config import ADVANCED, SECTIONS

    sections = [schema["section"] for _, schema in param_specs(RunConfig()).values()]
    assert sections == sorted(sections, key=SECTIONS.index)  # grouped, in the declared order
    assert set(sections) == set(SECTIONS) and sections[-1] == ADVANCED
    assert {"source", "classes"} <= {name for name, (_, schema) in param_specs(RunConfig()).items()
                                      if schema["section"] == "Data"}


@pytest.mark.parametrize("name, words", [("image_size", "32 to 1024"), ("val_fraction", "more than 0 and less than 1"),
                                         ("seed", "at least 0"), ("learning_rate", "more than 0 and at most 1")])
def test_descriptions_state_the_bounds_the_checks_apply(name, words):
    _, schema = param_specs(RunConfig())[name]
    assert f"Allowed: {words}." in schema["description"]


def _sizes(median_short_side: float, images: int = 100) -> dict:
    """A manifest whose training images have this median shorter side, as subsample records it."""
    quartiles = {"min": 1.0, "p25": median_short_side, "median": median_short_side, "p75": median_short_side,
                 "max": median_short_side}
    return {"image_sizes": {"train": {"images": images, "short_side": quartiles, "width": quartiles,
                                      "height": quartiles}}}


def test_image_size_is_auto_by_default_and_the_form_leaves_it_empty():
    default, schema = param_specs(RunConfig())["image_size"]
    assert default is None and "null" in schema["type"] and "auto" in schema["description"]
    for empty in (None, ""):
        assert RunConfig.from_params({"image_size": empty}).image_size is None
    with pytest.raises(ConfigError, match="image_size=8 is invalid"):
        RunConfig(image_size=8)  # a given size is still checked


@pytest.mark.parametrize("side, size", [(28, 96), (127, 96), (128, 128), (384, 128)])
def test_auto_image_size_follows_the_training_images_median_shorter_side(side, size):
    from tasks.config import AUTO_LARGE_SIDE, auto_image_size

    chosen, why = auto_image_size(_sizes(side))
    assert chosen == size
    assert f"{side} px" in why and str(AUTO_LARGE_SIDE) in why and f"{size} px" in why


def test_auto_image_size_without_statistics_keeps_the_size_runs_had_before():
    from tasks.config import AUTO_SMALL_SIZE, auto_image_size

    for manifest in (None, {}, {"image_sizes": {}}):
        size, why = auto_image_size(manifest)
        assert size == AUTO_SMALL_SIZE and "no image sizes" in why


def test_an_explicit_image_size_wins_over_auto(tmp_path):
    from tasks.config import planned_candidates

    large = _sizes(500)
    assert RunConfig(image_size=64).with_image_size(large).image_size == 64
    assert [c.image_size for c in planned_candidates(RunConfig(image_size=64, run_root=str(tmp_path)), large)] == [64]
    listed = RunConfig(candidates="efficientnet_lite0@160, efficientnet_lite0", run_root=str(tmp_path))
    assert [c.image_size for c in planned_candidates(listed, _sizes(28))] == [160, 96]  # @size wins, the rest auto


def test_the_candidates_are_planned_at_the_auto_size_and_the_decision_is_logged(tmp_path, caplog):
    from tasks import storage
    from tasks.config import planned_candidates

    cfg = RunConfig(run_root=str(tmp_path))
    (unresolved,) = candidate_list(cfg)
    assert unresolved.image_size is None and "-auto-" in unresolved.slug
    with pytest.raises(ConfigError, match="auto is not resolved"):
        cfg.for_candidate(unresolved)  # no step trains at a size nobody decided
    storage.write_json(cfg.artifact(artifacts.MANIFEST), _sizes(300, images=40))  # read from the run root
    with caplog.at_level("INFO", logger="tasks.config"):
        (planned,) = planned_candidates(cfg)
    assert (planned.image_size, planned.slug.split("-")[1]) == (128, "128")
    assert "median shorter side is 300 px" in caplog.text
    winner = cfg.for_candidate(planned)
    assert winner.image_size == 128 and winner.asked["image_size"] is None  # the report shows it was auto


@pytest.mark.parametrize(("mode", "manifest", "size", "trained"), [
    ("auto", _sizes(28), 96, False),  # Fashion-MNIST: upsampled 3.4 times
    ("auto", _sizes(367.5), 128, True),  # openclipart: downsampled
    ("auto", _sizes(128), 128, True),  # as large as the input
    ("auto", {}, 96, True),  # no statistics: as before the rule
    ("train", _sizes(28), 96, True),
    ("freeze", _sizes(367.5), 128, False),
])
def test_depthwise_kernels_train_when_the_images_are_at_least_the_input_size(mode, manifest, size, trained):
    from tasks.config import depthwise_trained

    decided, why = depthwise_trained(mode, manifest, size)
    assert decided is trained
    assert why.startswith(f"fine_tune_depthwise {mode}")
    assert mode != "auto" or ("trained" if trained else "frozen") in why
