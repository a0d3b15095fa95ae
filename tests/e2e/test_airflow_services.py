"""Real services: Airflow's scheduler, dag-processor, api-server and triggerer on loopback run the DAG
triggered through the REST API; the result lands in SeaweedFS and the report shows in the Airflow UI."""
from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig
from tests.conftest import ROOT, deployment_env, tiny_conf
from tests.e2e.airflow_services import AirflowServices
from tests.e2e.browser import chromium_binary, screenshot

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("TLP_TEST_ARTIFACTS", ROOT / ".test-artifacts"))


@pytest.fixture
def airflow(tmp_path, s3, s3_bucket):
    services = AirflowServices(tmp_path / "airflow", {
        "AIRFLOW_CONN_MODEL_STORE": s3.airflow_connection(),
        **deployment_env(f"{s3_bucket}/runs", f"{s3_bucket}/models"),
        # this deployment asks a human before promoting this model; `approver` may, `admin` (who triggers) may not
        "TLP_APPROVAL_MODELS": "tiny-model", "TLP_APPROVERS": "approver,admin",
    })
    services.start()
    yield services
    services.stop()


@pytest.mark.skipif(chromium_binary() is None, reason="needs Debian chromium (.ci/run installs it)")
def test_triggered_run_publishes_and_its_report_shows_in_the_ui(airflow, s3_bucket, tmp_path):
    conf = tiny_conf(tmp_path, "auto", publish_uri=f"{s3_bucket}/models")
    airflow.wait_for_dag("transfer_learning")

    run_id = airflow.trigger("transfer_learning", conf)
    airflow.answer_approval("transfer_learning", run_id, "approve", "Approve", "looks right", timeout_s=1200)
    state = airflow.wait_for_run("transfer_learning", run_id, timeout_s=600)

    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("transfer_learning", run_id)}
    assert state == "success", f"{states}\n{airflow.logs()}"
    assert {states["fine_tune"], states["skip_fine_tune"]} == {"success", "skipped"}
    assert states["approve"] == states["promote"] == "success"
    champion = storage.read_json(f"{s3_bucket}/models/tiny-model/champion.json")
    assert champion["run_id"] == run_id
    [decision] = [storage.read_json(uri) for uri in storage.list_files(f"{s3_bucket}/models/tiny-model/promotions/")]
    assert decision["promoted"] and decision["approval"]["approved"]
    assert decision["approval"]["comment"] == "looks right"
    assert decision["approval"]["by"].startswith("approver")
    assert storage.exists(f"{champion['uri']}/checksums.json")
    run = RunConfig(run_root=f"{s3_bucket}/runs", dag_id="transfer_learning", run_id=run_id)
    assert storage.exists(run.artifact(artifacts.REPORT, "index.html"))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cookie = [{"name": "_token", "value": airflow.token(), "url": airflow.base_url}]
    quoted = urllib.parse.quote(run_id, safe="")
    report_text = screenshot(f"{airflow.base_url}/ml-reports/runs/transfer_learning/{quoted}/eval/report/",
                             ARTIFACTS / "report_view.png", cookies=cookie)
    assert "accuracy" in report_text.lower() and "tiny-model" in report_text
    screenshot(f"{airflow.base_url}/dags/transfer_learning/runs/{quoted}/plugin/ml-report",
               ARTIFACTS / "report_tab_in_airflow_ui.png", cookies=cookie)
    assert (ARTIFACTS / "report_tab_in_airflow_ui.png").stat().st_size > 10_000
