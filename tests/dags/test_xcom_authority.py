"""A task trusts nothing in the config it rebuilds from XCom: run root, run identity and publish location are
checked again, and a conn:// source's credentials are resolved in the task, never carried in XCom or logs."""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from tasks.config import RunConfig
from tasks.errors import ConfigError, DatasetError
from tests.helpers.runs import ROOT


@pytest.fixture
def dag_module(monkeypatch, tmp_path):
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("TLP_PUBLISH_URI", "s3://models")
    spec = importlib.util.spec_from_file_location("tlp_dag_under_test", ROOT / "dags" / "transfer_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = SimpleNamespace(run_id="manual__real", dag_id="transfer_learning")
    monkeypatch.setattr(module, "get_current_context", lambda: {"dag_run": run})
    return module


@pytest.fixture
def connections(monkeypatch):
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    known = {}

    def get(conn_id):
        if conn_id not in known:
            raise AirflowNotFoundException(conn_id)
        return known[conn_id]

    monkeypatch.setattr(Connection, "get", staticmethod(get))
    return known


def test_forged_run_root_and_run_id_in_xcom_are_ignored(dag_module, connections, tmp_path):
    forged = {**RunConfig().to_dict(), "run_root": "file:///proc/self/environ#", "run_id": "someone_else",
              "dag_id": "other"}
    cfg = dag_module._config(forged)
    assert (cfg.run_root, cfg.run_id, cfg.dag_id) == (str(tmp_path / "runs"), "manual__real", "transfer_learning")


def test_forged_publish_location_in_xcom_is_refused(dag_module, connections):
    with pytest.raises(ConfigError, match="publish location"):
        dag_module._config({**RunConfig().to_dict(), "publish_uri": "s3://attacker/models"})


def test_conn_source_is_resolved_in_the_task_only(dag_module, connections):
    from airflow.sdk import Connection

    connections["food"] = Connection(conn_id="food", conn_type="http", login="me", password="p@ss/word",
                                     extra='{"url": "https://data.example.com/food.zip"}')
    values = {**RunConfig().to_dict(), "source": "conn://food"}
    assert dag_module._config(values).source == "https://me:p%40ss%2Fword@data.example.com/food.zip"
    with pytest.raises(DatasetError, match="no Airflow connection 'missing'"):
        dag_module._config({**values, "source": "conn://missing"})


def test_conn_test_source_is_resolved_in_the_task_only(dag_module, connections):
    from airflow.sdk import Connection

    connections["field"] = Connection(conn_id="field", conn_type="http", login="me", password="secret",
                                      extra='{"url": "https://data.example.com/field-test.zip"}')
    values = {**RunConfig().to_dict(), "test_source": "conn://field"}
    cfg = dag_module._config(values)
    assert cfg.test_source == "https://me:secret@data.example.com/field-test.zip"
    assert cfg.source == RunConfig().source
    with pytest.raises(DatasetError, match="test_source conn://gone: no Airflow connection 'gone'"):
        dag_module._config({**values, "test_source": "conn://gone"})


def test_configure_does_not_log_its_return_value():
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["transfer_learning"]
    assert dag.get_task("configure").show_return_value_in_logs is False
