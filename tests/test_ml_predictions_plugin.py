"""The Predictions tab of a batch_predict run: served behind Airflow's auth from the deployment's run root,
never from a location a run's conf or XCom names."""
from __future__ import annotations

import pytest

from tasks import artifacts, storage
from tasks.batch_config import run_uri
from tests.helpers.airflow import mint_token as _token

DAG_ID = "batch_predict"
GALLERY = "<!doctype html><h1>Least confident predictions</h1>"


def add_run(run_id: str, conf: dict) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.add(DagRun(dag_id=DAG_ID, run_id=run_id, conf=conf, run_type="manual", state="success"))


@pytest.fixture
def run_id(api, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "runs"))
    run_id = f"manual__2026-01-02T03:04:05+00:00-{tmp_path.name}"
    run = run_uri(str(tmp_path / "runs"), DAG_ID, run_id)
    storage.write_text(storage.join(run, *artifacts.BATCH_GALLERY.parts), GALLERY)
    storage.write_json(storage.join(run, *artifacts.BATCH_SUMMARY.parts), {"n_scored": 3})
    add_run(run_id, {"images": "/data/new", "run_root": str(tmp_path / "elsewhere")})
    return run_id


def test_gallery_and_summary_are_served_to_a_reader_of_the_run(api, run_id):
    auth = {"Authorization": f"Bearer {_token('viewer', 'viewer')}"}
    page = api.get(f"/ml-predictions/runs/{DAG_ID}/{run_id}/gallery", headers=auth)
    assert page.status_code == 200, page.text
    assert page.text == GALLERY and "default-src 'none'" in page.headers["content-security-policy"]
    summary = api.get(f"/ml-predictions/runs/{DAG_ID}/{run_id}/summary.json", headers=auth)
    assert summary.json() == {"n_scored": 3}


def test_anonymous_requests_and_other_files_are_refused(api, run_id):
    assert api.get(f"/ml-predictions/runs/{DAG_ID}/{run_id}/gallery").status_code == 401
    auth = {"Authorization": f"Bearer {_token('viewer', 'viewer')}"}
    assert api.get(f"/ml-predictions/runs/{DAG_ID}/{run_id}/listing.json", headers=auth).status_code == 404
    assert api.get(f"/ml-predictions/runs/{DAG_ID}/no-such-run/gallery", headers=auth).status_code == 404


def test_a_run_without_predictions_yet_says_when_they_appear(api, run_id, tmp_path):
    storage.delete(storage.join(run_uri(str(tmp_path / "runs"), DAG_ID, run_id), "predictions") + "/")
    auth = {"Authorization": f"Bearer {_token('viewer', 'viewer')}"}
    page = api.get(f"/ml-predictions/runs/{DAG_ID}/{run_id}/gallery", headers=auth)
    assert page.status_code == 404 and "merge_predictions" in page.text


def test_the_plugin_registers_the_run_tab():
    import importlib.util

    from tests.helpers.runs import ROOT

    spec = importlib.util.spec_from_file_location("ml_predictions_under_test", ROOT / "plugins" / "ml_predictions.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    [view] = plugin.MLPredictionsPlugin.external_views
    assert view["destination"] == "dag_run" and view["href"].endswith("/runs/{DAG_ID}/{RUN_ID}/gallery")
