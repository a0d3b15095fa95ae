"""The whole DAG runs in-process (dag.test) on tiny data against a real S3 store, down both branches."""
from __future__ import annotations

import json
import threading
import time
import urllib.parse

import pytest

from tasks import storage
from tests.helpers.airflow import AIRFLOW_ENV
from tests.helpers.runs import ROOT, deployment_env, tiny_conf

pytestmark = pytest.mark.slow


@pytest.fixture
def dag():
    """A freshly parsed DAG per test: dag.test() merges a run's conf into the DAG object's params."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags")).dags["transfer_learning"]


def run_states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


def deploy(monkeypatch, run_root: str, publish_uri: str) -> None:
    for key, value in deployment_env(run_root, publish_uri).items():
        monkeypatch.setenv(key, value)


def champion_events(version: str) -> list:
    """Asset events of the champion alias whose extra names this version."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(AssetEvent.extra, AssetModel.name).join(
            AssetModel, AssetEvent.asset_id == AssetModel.id)).all()
    return [name for extra, name in rows if name == "champion-tiny-model" and extra.get("version") == version]


def storage_read(server, uri: str) -> str:
    with _env(server):
        return storage.read_text(uri)


def storage_list(server, uri: str) -> list[str]:
    with _env(server):
        return storage.list_files(uri)


def _env(server):
    from unittest import mock

    return mock.patch.dict("os.environ", server.env())


def test_undeclared_conf_key_fails_the_run_before_any_work(dag, airflow_db, s3_bucket, model_store_connection,
                                                          tmp_path, monkeypatch):
    deploy(monkeypatch, str(tmp_path / "runs"), f"{s3_bucket}/models")
    conf = {**tiny_conf(tmp_path, "never", publish_uri=f"{s3_bucket}/models"), "force_promote": True}
    dag_run = dag.test(run_conf=conf)

    states = run_states(dag_run)
    assert dag_run.state == "failed" and states["configure"] == "failed", states
    assert states["acquire"] != "success" and not (tmp_path / "runs").exists()




def answer_pending_approval(option: str, comment: str, stop: threading.Event) -> None:
    """Act as the approver: poll Airflow's HITL REST API for the pending request and answer it."""
    from airflow.api_fastapi.app import create_app, get_auth_manager, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    with TestClient(create_app(apps="core")) as client:
        token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
        auth = {"Authorization": f"Bearer {token}"}
        while not stop.is_set():
            pending = client.get("/api/v2/dags/~/dagRuns/~/hitlDetails", headers=auth,
                                 params={"response_received": False}).json().get("hitl_details", [])
            if pending and pending[0]["task_instance"]["state"] == "awaiting_input":  # parked: safe to answer
                ti = pending[0]["task_instance"]
                run = urllib.parse.quote(ti["dag_run_id"], safe="")
                client.patch(f"/api/v2/dags/{ti['dag_id']}/dagRuns/{run}/taskInstances/{ti['task_id']}/-1/hitlDetails",
                             headers=auth, json={"chosen_options": [option], "params_input": {"comment": comment}})
                break
            time.sleep(1)
    purge_cached_app()


def test_two_candidates_without_fine_tuning_then_a_rejected_approval_publish_without_promoting(
        airflow_db, s3_bucket, model_store_connection, tmp_path, monkeypatch):
    """One run down the branch without fine-tuning, comparing two candidates, whose approval is rejected through
    Airflow's HITL REST API: the version is published, not promoted, and who rejected it and why are kept."""
    from airflow.dag_processing.dagbag import DagBag

    deploy(monkeypatch, str(tmp_path / "runs"), f"{s3_bucket}/models")
    for key, value in {**AIRFLOW_ENV, "TLP_APPROVAL_MODELS": "tiny-model", "TLP_APPROVERS": "admin"}.items():
        monkeypatch.setenv(key, value)
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["transfer_learning"]
    conf = {**tiny_conf(tmp_path, "never", publish_uri=f"{s3_bucket}/models"),
            "candidates": "efficientnet_lite0@32, mobilenet_v2@32", "backbone_weights": "none"}  # keras.applications
    stop = threading.Event()
    approver = threading.Thread(target=answer_pending_approval, args=("Reject", "not this week", stop), daemon=True)
    approver.start()
    try:
        dag_run = dag.test(run_conf=conf)
    finally:
        stop.set()
        approver.join(timeout=30)

    states = run_states(dag_run)
    assert dag_run.state == "success", states
    mapped = sorted(ti.map_index for ti in dag_run.get_task_instances() if ti.task_id == "train")
    assert mapped == [0, 1]  # the grid shows one train instance per candidate
    assert states["fine_tune"] == "skipped" and states["skip_fine_tune"] == "success"
    assert states["evaluate"] == states["publish_version"] == "success"
    [run_dir] = (tmp_path / "runs" / "transfer_learning").iterdir()
    board = json.loads((run_dir / "leaderboard.json").read_text())
    assert sorted(row["spec"] for row in board["candidates"]) == ["efficientnet_lite0@32", "mobilenet_v2@32"]
    decision = json.loads((run_dir / "candidates" / board["winner"] / "train" / "decision.json").read_text())
    assert decision["fine_tune"] is False and "never" in decision["reason"]
    best, evaluation = (dag_run.get_task_instance(task).xcom_pull(task_ids=task) for task in ("select", "evaluate"))
    assert evaluation["kept"] == "feature_extraction" and evaluation["model_uri"] == best["model_uri"]
    assert "candidates compared on validation accuracy" in (run_dir / "eval" / "model_card.md").read_text()

    assert states["approval_gate"] == states["approve"] == states["promote"] == "success"
    promoted = dag_run.get_task_instance("promote").xcom_pull(task_ids="promote")
    assert promoted["promoted"] is False and "rejected by admin" in promoted["reason"]
    assert promoted["approval"]["comment"] == "not this week"
    records = storage_list(model_store_connection, f"{s3_bucket}/models/tiny-model/promotions/")
    assert len(records) == 1
    assert not any(path.endswith("champion.json") for path in
                   storage_list(model_store_connection, f"{s3_bucket}/models/tiny-model/"))


def test_run_with_fine_tuning_on_a_savedmodel_backbone_from_s3_publishes_a_champion(dag, airflow_db, s3_bucket,
                                                                                   model_store_connection, tmp_path,
                                                                                   monkeypatch):
    """Down the fine-tuning branch on the seeds' own path: a SavedModel feature extractor (as TF Hub serves them),
    here from an S3 prefix (Lite0's fine-tuning: tests/test_fine_tune.py and the Airflow services e2e)."""
    from tasks import classifier
    from tests.helpers.backbones import tiny_convnet

    tiny_convnet().export(str(tmp_path / "encoder"), verbose=False)
    with _env(model_store_connection):
        storage.upload(tmp_path / "encoder", f"{s3_bucket}/encoders/tiny")
    deploy(monkeypatch, f"{s3_bucket}/runs", f"{s3_bucket}/models")
    conf = {**tiny_conf(tmp_path, "always", publish_uri=f"{s3_bucket}/models"),
            "backbone": f"{s3_bucket}/encoders/tiny", "fine_tune_layers": 1}
    dag_run = dag.test(run_conf=conf)

    states = run_states(dag_run)
    assert dag_run.state == "success", states
    assert states["fine_tune"] == states["publish_version"] == states["promote"] == "success"
    assert states["skip_fine_tune"] == "skipped"
    decision = dag_run.get_task_instance("decide").xcom_pull(task_ids="decide", key="decision")
    assert decision["fine_tune"] is True and "always" in decision["reason"]
    best, tuned, evaluation = (dag_run.get_task_instance(task).xcom_pull(task_ids=task)
                               for task in ("select", "fine_tune", "evaluate"))
    assert evaluation["model_uri"] == {"feature_extraction": best, "fine_tune": tuned}[evaluation["kept"]]["model_uri"]
    run_files = storage_list(model_store_connection, f"{s3_bucket}/runs/")
    assert any(path.endswith("eval/report/index.html") for path in run_files)
    champion = json.loads(storage_read(model_store_connection, f"{s3_bucket}/models/tiny-model/champion.json"))
    assert champion_events(champion["version"]), "a promotion must emit an asset event for downstream DAGs"
    files = storage_list(model_store_connection, champion["uri"] + "/")
    assert {f"{champion['uri']}/{name}" for name in ("model/classifier.json", "model/model.weights.h5",
                                                      "saved_model/saved_model.pb", "checksums.json")} <= set(files)
    with _env(model_store_connection):  # another worker, with an empty cache, rebuilds it (safe mode: no code)
        rebuilt = classifier.fetch(f"{champion['uri']}/model", tmp_path / "elsewhere", str(tmp_path / "empty"))
    assert rebuilt.model.output_shape == (None, 3) and rebuilt.spec.backbone == f"{s3_bucket}/encoders/tiny"
