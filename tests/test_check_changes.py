"""The check_changes step: a run whose data and config equal the champion's ends early; otherwise it reports what
changed."""
from __future__ import annotations

import json

import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig
from tasks.steps.check_changes import check_changes
from tests.helpers.changes import manifest as _manifest

VERSION = "20261201T000000.000Z-abcdef012345"


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    return RunConfig(run_root=str(tmp_path / "runs"), publish_uri=str(tmp_path / "models"), run_id="retrain-1",
                     dag_id="transfer_learning_retrain")


def _run_manifest(cfg: RunConfig, manifest: dict) -> dict:
    uri = cfg.artifact(artifacts.MANIFEST)
    storage.write_json(uri, manifest)
    return {"manifest": uri, "hash": manifest["hash"]}


def _champion(cfg: RunConfig, manifest: dict, params: dict) -> None:
    root = storage.join(cfg.publish_uri, cfg.model_name)
    storage.write_json(storage.join(root, "versions", VERSION, "manifest.json"), manifest)
    storage.write_json(storage.join(root, "versions", VERSION, "params.json"), params)
    storage.write_json(storage.join(root, "champion.json"), {"version": VERSION})


DATA = _manifest({"cat": [("1.jpg", "a"), ("2.jpg", "b")], "dog": [("1.jpg", "c"), ("2.jpg", "d")]})


@pytest.mark.fast
def test_without_a_champion_the_run_trains(cfg):
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    assert result["train"] and "no champion" in result["reason"]
    assert storage.read_json(result["uri"])["fingerprints"]["data"]


@pytest.mark.fast
def test_unchanged_data_and_config_end_the_run_with_the_reason(cfg):
    _champion(cfg, DATA, RunConfig(run_id="first", dag_id="transfer_learning").to_public_dict())
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    assert not result["train"]
    assert result["reason"] == f"data and config unchanged since champion {VERSION}: nothing to train"
    assert result["champion_version"] == VERSION


@pytest.mark.fast
def test_a_champion_trained_at_the_auto_image_size_is_unchanged_for_an_auto_run_on_the_same_data(cfg):
    from tasks.config import planned_candidates

    listed = RunConfig(run_id="first", dag_id="transfer_learning")  # image_size auto
    (planned,) = planned_candidates(listed, DATA)
    _champion(cfg, DATA, listed.for_candidate(planned).to_public_dict())  # params.json holds the size it ran at
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    assert not result["train"], result["reason"]


@pytest.mark.fast
def test_unchanged_trains_anyway_when_skip_unchanged_is_off(cfg):
    _champion(cfg, DATA, cfg.to_public_dict())
    import dataclasses

    result = check_changes(dataclasses.replace(cfg, skip_unchanged=False), _run_manifest(cfg, DATA))
    assert result["train"] and "skip_unchanged is off" in result["reason"]


@pytest.mark.fast
def test_a_changed_param_is_named(cfg):
    _champion(cfg, DATA, {**cfg.to_public_dict(), "epochs": 3})
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    report = json.loads(storage.read_text(result["uri"]))
    assert result["train"] and report["config_changed"] and not report["data_changed"]
    assert report["changed_params"] == ["epochs"]


@pytest.mark.fast
def test_removed_images_are_reported_per_class(cfg):
    _champion(cfg, DATA, cfg.to_public_dict())
    smaller = _manifest({"cat": [("1.jpg", "a")], "dog": [("1.jpg", "c"), ("2.jpg", "d")]})
    result = check_changes(cfg, _run_manifest(cfg, smaller))
    report = storage.read_json(result["uri"])
    assert result["train"] and report["data_changed"]
    assert report["files"]["per_class"]["cat"]["removed"] == 1
    assert report["embedding_shift"]["reason"] == "no new training images"
    assert report["prior_shift"]["p_value"] is not None
    assert "-1" in result["reason"] and VERSION in result["reason"]


@pytest.mark.fast
def test_a_handed_over_hash_that_differs_from_the_manifest_is_refused(cfg):
    from tasks.errors import MissingInputError

    handed = _run_manifest(cfg, DATA)
    with pytest.raises(MissingInputError, match="re-run subsample"):
        check_changes(cfg, {**handed, "hash": "something else"})


@pytest.mark.fast
def test_the_approval_request_note_says_what_changed(cfg):
    from tasks.steps.check_changes import changes_note

    assert changes_note(cfg) == ""
    _champion(cfg, DATA, cfg.to_public_dict())
    check_changes(cfg, _run_manifest(cfg, _manifest({"cat": [("1.jpg", "a")], "dog": [("1.jpg", "c"),
                                                                                     ("2.jpg", "d")]})))
    assert changes_note(cfg).startswith(f"\n\nData: since champion {VERSION}: +0 / -1 / ~0 training images")
