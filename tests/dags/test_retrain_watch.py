"""Retrain when data lands, end to end against SeaweedFS: the AssetWatcher's trigger (run directly, as the
triggerer would) sees new images under the watched prefix, the retrain DAG (dag.test, in process) computes
backbone features only for them and publishes a version; an unchanged prefix fires nothing. The new images look
unlike the champion's (white stripes): the better model is published but its promotion held for the shift
(TLP_SHIFT_AUC_THRESHOLD), and a retrain on the same data then trains nothing (unchanged since that judged version)."""
from __future__ import annotations

import asyncio
import json

import airflow  # noqa: F401 (as in the triggerer, Airflow makes the plugins folder importable)
import numpy as np
import pytest

from tasks import registry, storage
from tasks.config import safe_name
from tests.helpers.runs import ROOT, write_image_folder
from tests.helpers.triggers import next_event

pytestmark = pytest.mark.slow


def _retrain_dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags")).dags["transfer_learning_retrain"]


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


def _versions(models: str) -> set[str]:
    return {uri.split("/versions/")[1].split("/")[0] for uri in storage.list_files(f"{models}/watched/versions/")
            if uri.endswith("/checksums.json")}


def _upload_new_images(tmp_path, prefix: str) -> int:
    """Two new training images per class, each striped white every fourth column: the class's hue, another look."""
    from PIL import Image

    folder = write_image_folder(tmp_path / "new", {"dark": 2, "mid": 2, "light": 2}, splits=("train",), seed=7)
    for path in sorted(folder.rglob("*.jpg")):
        pixels = np.asarray(Image.open(path)).copy()
        pixels[:, ::4] = 255
        Image.fromarray(pixels).save(path, quality=90)
        storage.write_bytes(f"{prefix}{path.relative_to(folder).parent.as_posix()}/new-{path.name}",
                            path.read_bytes())
    return 6


def test_new_images_under_the_watched_prefix_start_a_retrain_that_computes_only_them(airflow_db, s3, s3_bucket,
                                                                                       tmp_path, monkeypatch):
    from s3_prefix_trigger import S3PrefixChangedTrigger

    prefix, models = f"{s3_bucket}/data/", f"{s3_bucket}/models"
    monkeypatch.setenv("TLP_RUN_ROOT", f"{s3_bucket}/runs")
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", models)
    monkeypatch.setenv("TLP_MIN_TEST_IMAGES", "1")  # a tiny test split: the first run must become the champion
    monkeypatch.setenv("TLP_CACHE_DIR", str(tmp_path / "cache-1"))
    folder = write_image_folder(tmp_path / "images", {"dark": 8, "mid": 8, "light": 8}, splits=("train", "test"))
    storage.upload(folder, prefix)
    conf = {"source": prefix, "train_percent": 100, "val_fraction": 0.25, "backbone": "efficientnet_lite0",
            "image_size": 32, "batch_size": 16, "epochs": 2, "patience": 1, "fine_tune": "never",
            "top_k_wrong": 5, "model_name": "watched", "publish_uri": models}

    # the first champion barely trained (a learning rate near 0): the retrain beats it on the same test images
    first = _retrain_dag().test(run_conf={**conf, "learning_rate": 1e-7, "epochs": 1})
    assert first.state == "success" and _states(first)["promote"] == "success", _states(first)
    assert len(_versions(models)) == 1
    trigger = S3PrefixChangedTrigger(prefix, interval_s=0.3)
    assert asyncio.run(next_event(trigger, 2.0)) is None, "nothing uploaded: nothing may start"

    async def upload_and_wait():
        events = trigger.run()
        waiting = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(1.0)
        added = await asyncio.to_thread(_upload_new_images, tmp_path, prefix)
        event = await asyncio.wait_for(waiting, 10)
        await events.aclose()
        return added, event

    added, event = asyncio.run(upload_and_wait())
    assert event.payload["prefix"] == prefix
    monkeypatch.setenv("TLP_CACHE_DIR", str(tmp_path / "cache-2"))  # acquire's s3 cache is keyed by the URI
    monkeypatch.setenv("TLP_SHIFT_AUC_THRESHOLD", "0.6")
    second = _retrain_dag().test(run_conf=conf)
    states = _states(second)
    assert second.state == "success" and states["promote"] == "success", states
    changes = second.get_task_instance("check_changes").xcom_pull(task_ids="check_changes", key="changes")
    report = storage.read_json(changes["uri"])
    assert report["files"]["totals"]["added"] == added and report["data_changed"]
    assert report["embedding_shift"]["backbone_images"] == added, "only the new images go through the backbone"
    run_uri = f"{s3_bucket}/runs/transfer_learning_retrain/{safe_name(second.run_id)}/"
    train_meta = [uri for uri in storage.list_files(run_uri) if uri.endswith("/features/meta.json")]
    computed = [sum(s["computed"] for s in json.loads(storage.read_bytes(uri))["splits"].values())
                for uri in train_meta]
    assert computed == [0], "training found every image's features in the store"
    assert len(_versions(models)) == 2
    # the retrain beats the champion, but the new images are a shift beyond the threshold: held, not promoted
    judged = second.get_task_instance("publish_version").xcom_pull(task_ids="publish_version")
    promoted = second.get_task_instance("promote").xcom_pull(task_ids="promote")
    assert report["embedding_shift"]["shifted"] and report["embedding_shift"]["auc"] > 0.6, report["embedding_shift"]
    assert judged["eligible"], judged["reason"]
    assert not promoted["promoted"] and promoted["reason"].startswith("held: embedding shift AUC "), promoted
    assert "TLP_SHIFT_AUC_THRESHOLD=0.6" in promoted["reason"]
    assert registry.read_champion(models, "watched")["version"] != judged["version"]

    third = _retrain_dag().test(run_conf=conf)  # the same data again: the judged (held) version has it already
    states = _states(third)
    assert third.state == "success" and states["check_changes"] == "success", states
    assert {states[task] for task in ("train", "select", "evaluate", "publish_version", "promote")} == {"skipped"}
    reason = third.get_task_instance("check_changes").xcom_pull(task_ids="check_changes", key="changes")["reason"]
    assert reason.startswith(f"data and config unchanged since version {judged['version']} (judged: not promoted, "
                             "held: embedding shift AUC ") and reason.endswith(": nothing to train"), reason
    assert len(_versions(models)) == 2
