"""The DAG's approval task: it asks from the recorded judgement, assigns the approvers but the run's triggerer, and
records the answer from the event Airflow resumes it with (Airflow's own HITL record), never from XCom."""
from __future__ import annotations

import hashlib
import importlib.util
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from unittest import mock

import pytest
from airflow.sdk.exceptions import TaskAwaitingInput

from tasks import registry, storage
from tasks.config import RunConfig
from tasks.steps.promote import promote
from tests.helpers.runs import ROOT

MODEL = "tiny"


@pytest.fixture(scope="module")
def dag_module():
    spec = importlib.util.spec_from_file_location("tlp_dag_approval_under_test", ROOT / "dags" / "transfer_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cfg(tmp_path, monkeypatch, dag_module) -> RunConfig:
    monkeypatch.setenv("TLP_APPROVAL_MODELS", MODEL)
    monkeypatch.setenv("TLP_APPROVERS", "ana,tom")
    monkeypatch.setenv("TLP_MIN_TEST_IMAGES", "1")
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", str(tmp_path / "models"))
    monkeypatch.setattr(dag_module, "_config", lambda cfg, winner=None: RunConfig.from_params(cfg))
    return RunConfig(run_id="run-1", run_root=str(tmp_path / "runs"), publish_uri=str(tmp_path / "models"),
                     model_name=MODEL, classes=["apple", "banana"])


def publish_fake_version(cfg: RunConfig) -> str:
    """A complete version with the judgement publish_version would record: eligible, no champion yet."""
    model_root = registry.model_root_of(cfg.publish_uri, cfg.model_name)
    version = "20261122T081500.123Z-" + hashlib.sha256(cfg.run_id.encode()).hexdigest()[:12]
    version_uri = registry.version_uri_of(model_root, version)
    storage.write_bytes(storage.join(version_uri, "model.bin"), b"weights")
    storage.write_json(storage.join(version_uri, registry.CHECKSUMS),
                       {"model.bin": hashlib.sha256(b"weights").hexdigest()})
    registry.write_judgement(model_root, {
        "eligible": True, "reason": "no champion yet", "new_accuracy": 0.9, "champion_accuracy": None, "gain": None,
        "gain_interval": None, "p_value": None, "n_test": 1000, "paired_test": None, "judged_on": "its test split",
        "min_accuracy": 0.0, "margin": 0.01, "alpha": 0.05, "min_test_images": 1, "champion_version": None,
        "champion_decision": None, "version": version, "version_uri": version_uri, "model_name": MODEL,
        "dag_id": cfg.dag_id, "run_id": cfg.run_id, "classes": ["apple", "banana"], "test_accuracy": 0.9,
        "report_uri": f"{version_uri}/report/index.html", "model_card_uri": f"{version_uri}/model_card.md",
        "serving_check": {"n_images": 8, "max_abs_diff": {"model": 0.0}, "tolerance": 1e-4},
        "tflite": {"status": "skipped", "variants": {}},
        "judged_at": (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()})
    return version


def context(cfg: RunConfig, published: dict, triggered_by: str = "tom") -> dict:
    xcom = {"configure": cfg.to_dict(), "publish_version": published}
    return {"ti": SimpleNamespace(xcom_pull=lambda task_ids: xcom[task_ids], id="ti-1"),
            "task_instance": SimpleNamespace(id="ti-1"),
            "dag_run": SimpleNamespace(triggering_user_name=triggered_by)}


def test_the_request_comes_from_the_store_and_the_triggerer_is_not_assigned(cfg, dag_module):
    version = publish_fake_version(cfg)
    forged = {"version": version, "eligible": True, "new_accuracy": 1.0, "reason": "trust me"}
    approve = dag_module.ApprovePromotion(task_id="approve", params=dag_module.APPROVAL_PARAMS)

    with mock.patch("airflow.providers.standard.operators.hitl.upsert_hitl_detail") as asked:
        with pytest.raises(BaseException) as parked:  # 3.3 parks the task in awaiting_input
            approve.execute(context(cfg, forged))

    assert type(parked.value).__name__ in ("TaskAwaitingInput", "TaskDeferred")
    request = asked.call_args.kwargs
    assert request["assigned_users"] == [{"id": "ana", "name": "ana"}]
    assert "0.9000" in request["subject"] and "trust me" not in request["body"] and "1.0000" not in request["body"]


def test_the_recorded_answer_is_the_hitl_event_and_promotes_only_for_an_approver(cfg, dag_module):
    version = publish_fake_version(cfg)
    approve = dag_module.ApprovePromotion(task_id="approve", params=dag_module.APPROVAL_PARAMS)
    event = {"chosen_options": ["Approve"], "params_input": {"comment": "looks right"},
             "responded_by_user": {"id": "ana", "name": "ana"}, "responded_at": datetime.now(timezone.utc),
             "timedout": False}

    answer = approve.execute_complete(context(cfg, {"version": version}), event)
    result = promote(cfg, version, triggered_by="tom")

    assert answer["responded_by"] == {"id": "ana", "name": "ana"} and answer["triggered_by"] == "tom"
    assert registry.read_approval(registry.model_root_of(cfg.publish_uri, MODEL), version) == answer
    assert result["promoted"] and "approved by ana (ana): 'looks right'" in result["reason"]


def test_an_approve_marked_by_hand_or_skipped_promotes_nothing(cfg, dag_module):
    version = publish_fake_version(cfg)
    approve = dag_module.ApprovePromotion(task_id="approve", params=dag_module.APPROVAL_PARAMS)
    with mock.patch("airflow.providers.standard.operators.hitl.upsert_hitl_detail"):
        with pytest.raises(TaskAwaitingInput):  # 3.3 parks the task in awaiting_input
            approve.execute(context(cfg, {"version": version}))
    # the task is then marked success by hand: execute_complete never runs, no answer is recorded

    result = promote(cfg, version, triggered_by="tom")

    assert not result["promoted"] and result["approval"]["status"] == "missing"
    assert registry.read_champion(cfg.publish_uri, MODEL) is None


def test_an_expired_request_is_recorded_as_expired(cfg, dag_module):
    version = publish_fake_version(cfg)
    approve = dag_module.ApprovePromotion(task_id="approve", params=dag_module.APPROVAL_PARAMS)
    timeout_default = {"chosen_options": ["Reject"], "params_input": {"comment": ""}, "responded_by_user": None,
                       "responded_at": datetime.now(timezone.utc), "timedout": True}

    approve.execute_complete(context(cfg, {"version": version}), timeout_default)
    result = promote(cfg, version, triggered_by="tom")

    assert not result["promoted"] and result["approval"]["status"] == "expired"
    assert "expired" in registry.list_decisions(cfg.publish_uri, MODEL)[0]["reason"]
