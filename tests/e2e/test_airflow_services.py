"""Real services: Airflow's scheduler, dag-processor, api-server and triggerer on loopback run the DAG; a person's
part is played in headless Chromium: approving the promotion in the HITL form, reading the report with its release
section and the registry, and triggering every DAG from its form with the defaults. Meanwhile the triggerer runs
the retrain DAG's data watcher: new images under the watched prefix start a retrain by themselves, nothing else
does. One start-up of the services serves all of it (they are the slowest part of the suite)."""
from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path

import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig
from tests.e2e.airflow_services import APPROVER, AirflowServices
from tests.e2e.browser import Browser, chromium_binary, screenshot
from tests.helpers.runs import ROOT, deployment_env, tiny_conf, write_image_folder

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_binary() is None, reason="needs Debian chromium (.ci/run installs it)")]
ARTIFACTS = Path(os.environ.get("TLP_TEST_ARTIFACTS", ROOT / ".test-artifacts"))
DAG_IDS = ("transfer_learning", "transfer_learning_retrain")
RETRAIN = "transfer_learning_retrain"
WATCHED_ASSET = "tlpipe-training-data"  # dags/transfer_learning.py: the asset TLP_RETRAIN_WATCH_URI names
WATCH_INTERVAL_S = 1.0
COMMENT = "looks right: checked the report"
CHATTER = ("cudart_stub", "absl::InitializeLog", "cuInit", "cpu_feature_guard", "XNNPACK")


@pytest.fixture
def airflow(tmp_path, s3, s3_bucket):
    services = AirflowServices(tmp_path / "airflow", {
        "AIRFLOW_CONN_MODEL_STORE": s3.airflow_connection(),
        **deployment_env(f"{s3_bucket}/runs", f"{s3_bucket}/models"),
        # this deployment asks a human before promoting this model; `approver` may, `admin` (who triggers) may not
        "TLP_APPROVAL_MODELS": "tiny-model", "TLP_APPROVERS": "approver,admin",
        # the retrain DAG also runs when images land under this prefix: the triggerer polls it every second
        "TLP_RETRAIN_WATCH_URI": f"{s3_bucket}/incoming/", "TLP_RETRAIN_WATCH_INTERVAL_S": str(WATCH_INTERVAL_S),
    })
    services.start()
    yield services
    services.stop()


def test_a_person_approves_reads_the_release_and_triggers_every_dag_from_its_form(airflow, s3_bucket, tmp_path):
    conf = tiny_conf(tmp_path, "auto", publish_uri=f"{s3_bucket}/models")
    # the watched prefix holds data before its watcher first looks (the retrain DAG is paused until then)
    storage.upload(write_image_folder(tmp_path / "first", {"dark": 2, "light": 2}, splits=("train",)),
                   f"{s3_bucket}/incoming/")
    airflow.wait_for_dag("transfer_learning")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cookie = [{"name": "_token", "value": airflow.token(), "url": airflow.base_url}]

    run_id = airflow.trigger("transfer_learning", conf)
    # while that run trains: the retrain DAG's data watcher in the triggerer
    new_images_under_the_watched_prefix_start_a_retrain_and_nothing_else_does(airflow, f"{s3_bucket}/incoming/",
                                                                              tmp_path)
    airflow.wait_until_parked("transfer_learning", run_id, "approve", timeout_s=1200)
    approver = [{"name": "_token", "value": airflow.token(APPROVER), "url": airflow.base_url}]
    with Browser(approver) as browser:
        approve_in_the_form(browser, airflow.base_url, "transfer_learning", run_id)
    state = airflow.wait_for_run("transfer_learning", run_id, timeout_s=600)

    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("transfer_learning", run_id)}
    assert state == "success", f"{states}\n{airflow.logs()}"
    assert {states["fine_tune"], states["skip_fine_tune"]} == {"success", "skipped"}
    assert states["approve"] == states["promote"] == "success"
    champion = storage.read_json(f"{s3_bucket}/models/tiny-model/champion.json")
    assert champion["run_id"] == run_id
    [decision] = [storage.read_json(uri) for uri in storage.list_files(f"{s3_bucket}/models/tiny-model/promotions/")]
    assert decision["promoted"] and decision["approval"]["approved"]
    assert decision["approval"]["comment"] == COMMENT  # typed into the form
    assert decision["approval"]["by"].startswith("approver")  # the approver's own login, not the triggerer's
    assert storage.exists(f"{champion['uri']}/checksums.json")
    run = RunConfig(run_root=f"{s3_bucket}/runs", dag_id="transfer_learning", run_id=run_id)
    assert storage.exists(run.artifact(artifacts.REPORT, artifacts.REPORT_PAGE))
    assert_task_logs_start_quietly(airflow.home, run_id)

    quoted = urllib.parse.quote(run_id, safe="")
    report_text = screenshot(f"{airflow.base_url}/ml-reports/runs/transfer_learning/{quoted}/eval/report/",
                             ARTIFACTS / "report_view.png", cookies=cookie)
    assert "accuracy" in report_text.lower() and "tiny-model" in report_text
    with Browser(cookie) as browser:
        browser.open(f"{airflow.base_url}/ml-reports/runs/transfer_learning/{quoted}/eval/report/#release")
        time.sleep(1.0)
        browser.screenshot(ARTIFACTS / "release_section.png")
        release = browser.text()
    assert "Release" in release and champion["version"] in release and "promoted" in release.lower()
    assert COMMENT in release
    registry_text = screenshot(f"{airflow.base_url}/ml-reports/registry?model_name=tiny-model"
                               f"&publish_uri={urllib.parse.quote(s3_bucket + '/models')}",
                               ARTIFACTS / "registry.png", cookies=cookie)
    assert champion["version"] in registry_text and "champion" in registry_text
    screenshot(f"{airflow.base_url}/dags/transfer_learning/runs/{quoted}/plugin/ml-report",
               ARTIFACTS / "report_tab_in_airflow_ui.png", cookies=cookie)
    assert (ARTIFACTS / "report_tab_in_airflow_ui.png").stat().st_size > 10_000

    for dag_id in DAG_IDS:
        with Browser(cookie) as browser:
            started = trigger_from_the_form(browser, airflow, dag_id)
        defaults = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(started, safe='')}")
        assert defaults["conf"]["source"] == RunConfig.source and defaults["conf"]["source_sha256"] is None
        airflow.stop_runs(dag_id)  # the default run is the full demo: started is all this test needs


def new_images_under_the_watched_prefix_start_a_retrain_and_nothing_else_does(airflow: AirflowServices,
                                                                              prefix: str, tmp_path: Path) -> None:
    """The retrain DAG's AssetWatcher (plugins/s3_prefix_trigger.py) in the real triggerer: while nothing is
    uploaded it fires nothing; new images under the prefix start an asset-triggered retrain by themselves."""
    airflow.unpause(RETRAIN)  # its watcher runs only while the DAG is unpaused
    asset_id = airflow.asset_id(WATCHED_ASSET)
    deadline = time.monotonic() + 120
    while (baseline := airflow.asset_state(asset_id, "listing_fingerprint")) is None:
        assert time.monotonic() < deadline, f"the watcher never took its first listing\n{airflow.logs()}"
        time.sleep(0.5)
    # unpausing may start the cron's latest run (default params): it would hold the DAG's one active run
    airflow.fail_runs(RETRAIN, "scheduled")

    time.sleep(5 * WATCH_INTERVAL_S)  # five polls of the unchanged prefix
    assert airflow.request("GET", f"/api/v2/assets/events?asset_id={asset_id}")["asset_events"] == []
    assert asset_triggered(airflow) == [], "nothing was uploaded, yet a retrain started"
    assert airflow.asset_state(asset_id, "listing_fingerprint") == baseline

    storage.upload(write_image_folder(tmp_path / "new", {"dark": 2, "light": 2}, splits=("train",), seed=7),
                   prefix + "batch-2/")
    deadline = time.monotonic() + 120
    while not (started := asset_triggered(airflow)):
        assert time.monotonic() < deadline, f"uploading new images started no retrain within 120 s\n{airflow.logs()}"
        airflow.fail_runs(RETRAIN, "scheduled")
        time.sleep(1)
    [run] = started
    quoted = urllib.parse.quote(run["dag_run_id"], safe="")
    [event] = airflow.request("GET", f"/api/v2/dags/{RETRAIN}/dagRuns/{quoted}/upstreamAssetEvents")["asset_events"]
    assert event["name"] == WATCHED_ASSET and event["extra"]["from_trigger"] is True
    payload = event["extra"]["payload"]
    assert payload["prefix"] == prefix and payload["previous"] == baseline != payload["fingerprint"]
    assert airflow.asset_state(asset_id, "listing_fingerprint") == payload["fingerprint"]
    airflow.stop_runs(RETRAIN)  # a retrain of the deployment's defaults: that it started is what is checked here


def asset_triggered(airflow: AirflowServices) -> list[dict]:
    return [run for run in airflow.run_details(RETRAIN) if run["run_type"] == "asset_triggered"]


def approve_in_the_form(browser: Browser, base_url: str, dag_id: str, run_id: str) -> None:
    """Answer the approval as a person does: the task's Required Action tab, a comment, the Approve button."""
    quoted = urllib.parse.quote(run_id, safe="")
    browser.open(f"{base_url}/dags/{dag_id}/runs/{quoted}/tasks/approve/required_actions")
    browser.wait_for("document.querySelector('[data-testid=hitl-option-Approve]')", "the Approve button")
    time.sleep(1.0)  # the form validates its fields once they are shown
    assert not browser.eval("document.querySelector('[data-testid=hitl-option-Approve]').disabled"), \
        "the approval form opened with an error: Approve is disabled before anything is typed"
    browser.type_into("#element_comment", COMMENT)
    browser.screenshot(ARTIFACTS / "approval_form.png")
    browser.click("[data-testid=hitl-option-Approve]")
    browser.wait_for("document.querySelector('[data-testid=hitl-option-Approve]') === null || "
                     "document.querySelector('[data-testid=hitl-option-Approve]').disabled", "the answer taken")


def trigger_from_the_form(browser: Browser, airflow: AirflowServices, dag_id: str) -> str:
    """Open the DAG's trigger form, check it opens clean with Trigger enabled, click Trigger with every default;
    returns the id of the run that started."""
    before = set(airflow.runs(dag_id))
    browser.open(f"{airflow.base_url}/dags/{dag_id}")
    browser.click("[data-testid=trigger-dag-button]")
    browser.wait_for("document.querySelector('[data-testid=config-form]')", "the trigger form")
    browser.click_text("Data")  # a section, as a person opens it
    time.sleep(1.0)
    assert browser.eval("document.querySelector('[data-testid=trigger-dag-submit]').disabled") is False, \
        f"{dag_id}: the trigger form opened with an error (Trigger disabled):\n{browser.text()[:2000]}"
    browser.screenshot(ARTIFACTS / f"trigger_form_{dag_id}.png")
    browser.click("[data-testid=trigger-dag-submit]")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # queued or running: the retrain DAG's run may queue behind the scheduled run that unpausing started
        started = [run for run in set(airflow.runs(dag_id)) - before if run.startswith("manual__")]
        if started:
            return started[0]
        time.sleep(1)
    raise AssertionError(f"{dag_id}: clicking Trigger started no run within 60 s: {airflow.runs(dag_id)}; "
                         f"the page shows:\n{browser.text()[:2000]}")


def assert_task_logs_start_quietly(home: Path, run_id: str) -> None:
    """TensorFlow tasks' logs carry no start-up chatter as ERROR lines (tasks.tf_logging)."""
    logs = [path for path in (home / "logs").rglob("*.log") if f"run_id={run_id}" in str(path)
            and any(f"task_id={task}" in str(path) for task in ("train", "evaluate", "publish_version"))]
    assert logs
    for path in logs:
        errors = [line for line in path.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        chatter = [line for line in errors if any(word in line for word in CHATTER)]
        assert chatter == [], path
