"""The check_changes step: a run whose data and config equal the champion's ends early; otherwise it reports what
changed."""
from __future__ import annotations

import hashlib
import json

import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig
from tasks.steps.check_changes import check_changes
from tests.helpers.changes import manifest as _manifest

VERSION = "20261201T000000.000Z-abcdef012345"
NEWER = "20261201T010000.000Z-0123456789ab"


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    return RunConfig(run_root=str(tmp_path / "runs"), publish_uri=str(tmp_path / "models"), run_id="retrain-1",
                     dag_id="transfer_learning_retrain")


def _run_manifest(cfg: RunConfig, manifest: dict) -> dict:
    uri = cfg.artifact(artifacts.MANIFEST)
    storage.write_json(uri, manifest)
    return {"manifest": uri, "hash": manifest["hash"]}


def _publish(cfg: RunConfig, version: str, manifest: dict, params: dict, judgement: dict | None = None) -> str:
    """A complete version's records (manifest, params, checksums.json over them) and, if given, its judgement."""
    root = storage.join(cfg.publish_uri, cfg.model_name)
    version_uri = storage.join(root, "versions", version)
    checksums = {}
    for name, record in (("manifest.json", manifest), ("params.json", params)):
        storage.write_json(storage.join(version_uri, name), record)
        checksums[name] = hashlib.sha256(storage.read_bytes(storage.join(version_uri, name))).hexdigest()
    storage.write_json(storage.join(version_uri, "checksums.json"), checksums)
    if judgement is not None:
        storage.write_json(storage.join(root, "judgements", f"{version}.json"), {"version": version, **judgement})
    return version_uri


def _champion(cfg: RunConfig, manifest: dict, params: dict) -> None:
    _publish(cfg, VERSION, manifest, params, {"eligible": True, "reason": "no champion yet"})
    storage.write_json(storage.join(cfg.publish_uri, cfg.model_name, "champion.json"), {"version": VERSION})


def _not_promoted(cfg: RunConfig, version: str, manifest: dict, params: dict, reason: str) -> None:
    """A published, judged version whose promotion was refused (its decision recorded under promotions/)."""
    _publish(cfg, version, manifest, params, {"eligible": False, "reason": reason})
    storage.write_json(storage.join(cfg.publish_uri, cfg.model_name, "promotions", f"20261201T010000000000Z-{version}"
                                    ".json"), {"kind": "publish", "version": version, "promoted": False,
                                               "reason": reason})


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


@pytest.mark.fast
def test_unchanged_since_the_newest_judged_version_ends_the_run_though_it_was_not_promoted(cfg):
    _champion(cfg, _manifest({"cat": [("1.jpg", "a")], "dog": [("1.jpg", "c")]}), cfg.to_public_dict())
    _not_promoted(cfg, NEWER, DATA, cfg.to_public_dict(), "does not beat the champion")
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    assert not result["train"] and result["judged_version"] == NEWER
    assert result["reason"] == (f"data and config unchanged since version {NEWER} (judged: not promoted, does not "
                                "beat the champion): nothing to train")
    assert storage.read_json(result["uri"])["reason"] == result["reason"]


@pytest.mark.fast
def test_changed_data_or_config_since_the_newest_judged_version_still_trains(cfg):
    bigger = _manifest({"cat": [("1.jpg", "a"), ("2.jpg", "b"), ("3.jpg", "e")], "dog": [("1.jpg", "c"),
                                                                                         ("2.jpg", "d")]})
    _champion(cfg, bigger, cfg.to_public_dict())
    _not_promoted(cfg, NEWER, DATA, cfg.to_public_dict(), "does not beat the champion")
    fewer = _manifest({"cat": [("1.jpg", "a")], "dog": [("1.jpg", "c"), ("2.jpg", "d")]})  # only removals: no
    result = check_changes(cfg, _run_manifest(cfg, fewer))                                # backbone for the report
    assert result["train"] and result["judged_version"] is None
    assert storage.read_json(result["uri"])["champion_version"] == VERSION, "the report is against the champion"
    import dataclasses

    other = dataclasses.replace(cfg, epochs=cfg.epochs + 1)
    assert check_changes(other, _run_manifest(other, DATA))["train"]
    assert storage.read_json(other.artifact(artifacts.CHANGES))["files"]["totals"]["removed"] == 1
    off = dataclasses.replace(cfg, skip_unchanged=False)
    assert check_changes(off, _run_manifest(off, DATA))["train"]


@pytest.mark.fast
def test_the_newest_versions_records_count_only_when_they_match_its_checksums(cfg):
    """A manifest edited in the store after publishing (or a version without checksums.json) is no reason to skip."""
    _not_promoted(cfg, NEWER, DATA, cfg.to_public_dict(), "below the floor")
    version_uri = storage.join(cfg.publish_uri, cfg.model_name, "versions", NEWER)
    storage.write_json(storage.join(version_uri, "manifest.json"), _manifest({"cat": [("9.jpg", "z")]}))
    tampered = _manifest({"cat": [("9.jpg", "z")]})
    assert check_changes(cfg, _run_manifest(cfg, tampered))["train"]
    storage.delete(storage.join(version_uri, "checksums.json"))
    assert check_changes(cfg, _run_manifest(cfg, DATA))["train"]


@pytest.mark.fast
def test_a_judged_version_awaiting_its_decision_is_named_so(cfg):
    _publish(cfg, NEWER, DATA, cfg.to_public_dict(), {"eligible": True, "reason": "no champion yet"})
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    assert not result["train"]
    assert f"since version {NEWER} (judged: eligible, no promotion decision recorded yet" in result["reason"]


@pytest.mark.fast
def test_an_incomplete_newer_version_is_passed_over_for_the_newest_complete_one(cfg):
    _not_promoted(cfg, NEWER, DATA, cfg.to_public_dict(), "does not beat the champion")
    newest = "20261201T020000.000Z-0123456789ac"
    _publish(cfg, newest, DATA, cfg.to_public_dict(), {"eligible": True, "reason": "no champion yet"})
    storage.delete(storage.join(cfg.publish_uri, cfg.model_name, "versions", newest, "checksums.json"))
    result = check_changes(cfg, _run_manifest(cfg, DATA))
    assert not result["train"] and result["judged_version"] == NEWER
