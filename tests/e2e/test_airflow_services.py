"""The deployment as processes on loopback, without Docker, used as people use it.

The scale-out topology: PostgreSQL (metadata DB and Celery results) and Redis (broker) from the Debian packages;
the scheduler, dag-processor, api-server and triggerer; two Celery workers, each with its own working directory,
Airflow home, cache, temp dir and log server, as if on two machines. The train/fine_tune/evaluate tasks go to
queue `gpu` (TLP_TRAIN_QUEUE), which only worker-b serves; everything else goes to `default`, which only worker-a
serves. The dataset source, run root and publish URI are all on SeaweedFS, and the workers get S3 credentials only
through the Airflow connection, so the only way data can cross from one worker to the other is object storage.

A person's part is played in headless Chromium: approving the promotion in the HITL form as a second user,
reading the report with its release section and the registry, and triggering every DAG from its form with the
defaults. batch_predict then scores an S3 prefix with the champion that run published: its score_shard tasks go
to queue `score` (TLP_SCORE_QUEUE), which both workers serve. Meanwhile the triggerer runs the retrain DAG's data
watcher: new images under the watched prefix start a retrain by themselves, nothing else does.

One start-up of the services serves all of it (they are the slowest part of the suite).
"""
from __future__ import annotations

import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from tasks import artifacts, classifier, storage
from tasks.config import RunConfig, candidate_list, safe_name
from tasks.data_watch import listing_fingerprint
from tests.e2e.airflow_services import APPROVER, AirflowServices, Worker
from tests.e2e.browser import Browser, chromium_binary, screenshot
from tests.e2e.local_services import missing_packages, start_postgres, start_redis
from tests.helpers.runs import ROOT, deployment_env, tiny_conf, write_image_folder

# CI installs the packages (.ci/run), so there a missing server fails the test instead of skipping it
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_binary() is None, reason="needs Debian chromium (.ci/run installs it)"),
    pytest.mark.skipif(bool(missing_packages()) and os.environ.get("CI") != "true",
                       reason=f"needs the Debian packages {' '.join(missing_packages())} (.ci/run installs them)"),
]
ARTIFACTS = Path(os.environ.get("TLP_TEST_ARTIFACTS", ROOT / ".test-artifacts"))
DAG_ID = "transfer_learning"
DAG_IDS = (DAG_ID, "transfer_learning_retrain")
BATCH_DAG_ID = "batch_predict"
TRAIN_QUEUE = "gpu"
SCORE_QUEUE = "score"
RETRAIN = "transfer_learning_retrain"
WATCHED_ASSET = "tlpipe-training-data"  # dags/transfer_learning.py: the asset TLP_RETRAIN_WATCH_URI names
WATCH_INTERVAL_S = 1.0
COMMENT = "looks right: checked the report"
CHATTER = ("cudart_stub", "absl::InitializeLog", "cuInit", "cpu_feature_guard", "XNNPACK")


@pytest.fixture
def postgres():
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def redis_broker():
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def workers(tmp_path) -> dict[str, Worker]:
    """Queue -> the one worker that serves it."""
    return {"default": Worker("worker-a", "default", tmp_path / "worker-a", (SCORE_QUEUE,)),
            TRAIN_QUEUE: Worker("worker-b", TRAIN_QUEUE, tmp_path / "worker-b", (SCORE_QUEUE,))}


@pytest.fixture
def airflow(tmp_path, s3, s3_bucket, postgres, redis_broker, workers):
    services = AirflowServices(tmp_path / "airflow", {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url(),
        "AIRFLOW__CELERY__BROKER_URL": redis_broker.url,
        "AIRFLOW__CELERY__RESULT_BACKEND": postgres.url("db+postgresql+psycopg2"),
        "TLP_TRAIN_QUEUE": TRAIN_QUEUE,  # read when the DAG file is parsed: every component needs it
        "TLP_SCORE_QUEUE": SCORE_QUEUE,
        "AIRFLOW_CONN_MODEL_STORE": s3.airflow_connection(),
        **deployment_env(f"{s3_bucket}/runs", f"{s3_bucket}/models"),
        # this deployment asks a human before promoting this model; `approver` may, `admin` (who triggers) may not
        "TLP_APPROVAL_MODELS": "tiny-model", "TLP_APPROVERS": "approver,admin",
        # the retrain DAG also runs when images land under this prefix: the triggerer polls it every second
        "TLP_RETRAIN_WATCH_URI": f"{s3_bucket}/incoming/", "TLP_RETRAIN_WATCH_INTERVAL_S": str(WATCH_INTERVAL_S),
    }, extra_components=[worker.component() for worker in workers.values()])
    try:
        services.start()
        yield services
    finally:
        services.stop()


def test_a_run_on_two_workers_is_approved_read_scored_and_retrained_on_new_data_as_people_use_it(
        airflow, workers, s3_bucket, tmp_path):
    conf = tiny_conf(tmp_path, "auto", publish_uri=f"{s3_bucket}/models")
    source = f"{s3_bucket}/source/"
    storage.upload(conf["source"], source)
    shutil.rmtree(conf["source"])  # no worker can read the images from a local folder
    conf["source"] = source
    # the watched prefix holds data before its watcher first looks (the retrain DAG is paused until then)
    storage.upload(write_image_folder(tmp_path / "first", {"dark": 2, "light": 2}, splits=("train",)),
                   f"{s3_bucket}/incoming/")
    airflow.wait_for_dag(DAG_ID)

    run_id = airflow.trigger(DAG_ID, conf)
    # while that run trains: the retrain DAG's data watcher in the triggerer
    new_images_under_the_watched_prefix_start_a_retrain_and_nothing_else_does(airflow, f"{s3_bucket}/incoming/",
                                                                              tmp_path)
    airflow.wait_until_parked(DAG_ID, run_id, "approve", timeout_s=1200)
    approver = [{"name": "_token", "value": airflow.token(APPROVER), "url": airflow.base_url}]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Browser(approver) as browser:
        approve_in_the_form(browser, airflow.base_url, DAG_ID, run_id)
    state = airflow.wait_for_run(DAG_ID, run_id, timeout_s=600)

    instances = airflow.task_instances(DAG_ID, run_id)
    summary = {ti["task_id"]: (ti["state"], ti["queue"], ti["hostname"]) for ti in instances}
    assert state == "success", f"{summary}\n{failure_logs(workers, run_id, instances)}\n{airflow.logs()}"
    states = {ti["task_id"]: ti["state"] for ti in instances}
    assert {states["fine_tune"], states["skip_fine_tune"]} == {"success", "skipped"}
    assert states["approve"] == states["promote"] == "success"
    champion = storage.read_json(f"{s3_bucket}/models/tiny-model/champion.json")
    assert champion["run_id"] == run_id
    assert storage.exists(f"{champion['uri']}/checksums.json")
    [decision] = [storage.read_json(uri) for uri in storage.list_files(f"{s3_bucket}/models/tiny-model/promotions/")]
    assert decision["promoted"] and decision["approval"]["approved"]
    assert decision["approval"]["comment"] == COMMENT  # typed into the form
    assert decision["approval"]["by"].startswith("approver")  # the approver's own login, not the triggerer's
    assert_task_logs_start_quietly(workers.values(), run_id)

    each_worker_ran_its_queue_and_data_crossed_only_through_object_storage(workers, instances, conf, s3_bucket,
                                                                           run_id)
    cookie = [{"name": "_token", "value": airflow.token(), "url": airflow.base_url}]
    a_person_reads_the_report_its_release_and_the_registry(airflow, cookie, s3_bucket, run_id, champion)
    two_workers_score_shards_of_one_prefix(airflow, workers, s3_bucket, tmp_path, champion)

    for dag_id in DAG_IDS:
        with Browser(cookie) as browser:
            started = trigger_from_the_form(browser, airflow, dag_id)
        defaults = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(started, safe='')}")
        assert defaults["conf"]["source"] == RunConfig.source and defaults["conf"]["source_sha256"] is None
        airflow.stop_runs(dag_id)  # the default run is the full demo: started is all this test needs


def each_worker_ran_its_queue_and_data_crossed_only_through_object_storage(
        workers: dict[str, Worker], instances: list[dict], conf: dict, s3_bucket: str, run_id: str) -> None:
    ran = {ti["task_id"]: ti for ti in instances if ti["state"] == "success"}
    summary = {ti["task_id"]: (ti["state"], ti["queue"], ti["hostname"]) for ti in instances}
    assert {ran[t]["queue"] for t in ("train", "evaluate")} == {TRAIN_QUEUE}
    assert {ran[t]["queue"] for t in ("configure", "acquire", "subsample", "candidates", "select", "decide",
                                      "publish_version", "approve", "promote")} == {"default"}
    for task_id, ti in ran.items():
        worker = workers[ti["queue"]]
        assert ti["hostname"] == worker.name, summary
        others = [other for other in workers.values() if other is not worker]
        assert worker.task_logs(DAG_ID, run_id, task_id), f"no log of {task_id} on {worker.name}"
        assert not any(other.task_logs(DAG_ID, run_id, task_id) for other in others), f"{task_id} also ran elsewhere"
    assert {ti["hostname"] for ti in ran.values()} == {"worker-a", "worker-b"}

    # every hand-over between the workers went through the run root on S3
    run = RunConfig.from_params(conf, run_root=f"{s3_bucket}/runs", dag_id=DAG_ID, run_id=run_id)
    run_uri, winner = run.run_uri, run.for_candidate(candidate_list(run)[0])
    handed_over = {run.artifact(artifact) for artifact in (
        *(artifacts.split_records(split) for split in ("train", "val", "test")), artifacts.METRICS)}
    handed_over |= {winner.artifact(artifacts.HISTORY), winner.artifact(artifacts.DECISION),
                    winner.artifact(artifacts.FEATURE_EXTRACTION_MODEL, classifier.WEIGHTS_FILE),
                    run.artifact(artifacts.REPORT, artifacts.REPORT_PAGE)}
    assert handed_over <= set(storage.list_files(run_uri + "/")), sorted(handed_over)

    # each worker's local cache holds only what that worker fetched itself
    worker_a, worker_b = workers["default"], workers[TRAIN_QUEUE]
    assert any((worker_a.cache / "datasets").iterdir()), "acquire cached the S3 source on worker-a"
    assert not (worker_b.cache / "datasets").exists(), "worker-b must not hold a copy of the dataset"
    assert list(worker_b.cache.glob("efficientnet_lite0/*.npz")), "worker-b converts its own backbone weights"
    assert not (worker_a.cache / "efficientnet_lite0").exists(), "no backbone work may land in worker-a's cache"


def a_person_reads_the_report_its_release_and_the_registry(airflow: AirflowServices, cookie: list[dict],
                                                           s3_bucket: str, run_id: str, champion: dict) -> None:
    quoted = urllib.parse.quote(run_id, safe="")
    report_text = screenshot(f"{airflow.base_url}/ml-reports/runs/{DAG_ID}/{quoted}/eval/report/",
                             ARTIFACTS / "report_view.png", cookies=cookie)
    assert "accuracy" in report_text.lower() and "tiny-model" in report_text
    with Browser(cookie) as browser:
        browser.open(f"{airflow.base_url}/ml-reports/runs/{DAG_ID}/{quoted}/eval/report/#release")
        time.sleep(1.0)
        browser.screenshot(ARTIFACTS / "release_section.png")
        release = browser.text()
    assert "Release" in release and champion["version"] in release and "promoted" in release.lower()
    assert COMMENT in release
    registry_text = screenshot(f"{airflow.base_url}/ml-reports/registry?model_name=tiny-model"
                               f"&publish_uri={urllib.parse.quote(s3_bucket + '/models')}",
                               ARTIFACTS / "registry.png", cookies=cookie)
    assert champion["version"] in registry_text and "champion" in registry_text
    screenshot(f"{airflow.base_url}/dags/{DAG_ID}/runs/{quoted}/plugin/ml-report",
               ARTIFACTS / "report_tab_in_airflow_ui.png", cookies=cookie)
    assert (ARTIFACTS / "report_tab_in_airflow_ui.png").stat().st_size > 10_000


def two_workers_score_shards_of_one_prefix(airflow: AirflowServices, workers: dict[str, Worker], s3_bucket: str,
                                           tmp_path: Path, champion: dict) -> None:
    """batch_predict on an S3 prefix (with two files that cannot be decoded): both workers score shards."""
    from tests.helpers.batch import UNREADABLE, batch_folder

    images = f"{s3_bucket}/new-images/"
    storage.upload(batch_folder(tmp_path / "new-images", per_class=8), images)
    airflow.wait_for_dag(BATCH_DAG_ID)
    run_id = airflow.trigger(BATCH_DAG_ID, {"images": images, "model_name": "tiny-model", "shard_size": 4,
                                            "publish_uri": f"{s3_bucket}/models"})
    state = airflow.wait_for_run(BATCH_DAG_ID, run_id, timeout_s=900)

    instances = airflow.task_instances(BATCH_DAG_ID, run_id)
    summary = [(ti["task_id"], ti["map_index"], ti["state"], ti["queue"], ti["hostname"]) for ti in instances]
    assert state == "success", f"{summary}\n{failure_logs(workers, run_id, instances, BATCH_DAG_ID)}"
    shards = [ti for ti in instances if ti["task_id"] == "score_shard"]
    assert len(shards) == 7 and {ti["queue"] for ti in shards} == {SCORE_QUEUE}, summary  # 26 images / 4
    assert {ti["hostname"] for ti in shards} == {"worker-a", "worker-b"}, summary
    merged = storage.read_json(f"{s3_bucket}/runs-predictions/tiny-model/runs/{BATCH_DAG_ID}/"
                               f"{safe_name(run_id)}/summary.json")
    assert merged["n_scored"] == 24 and merged["n_unreadable"] == len(UNREADABLE)
    assert merged["model_version"] == champion["version"]


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
    # the upload is one PUT per file: a poll may fall between two of them and fire on part of the batch, the next
    # poll on the rest; either way the watcher ends remembering the whole listing
    uploaded = listing_fingerprint(prefix)
    deadline = time.monotonic() + 30
    while airflow.asset_state(asset_id, "listing_fingerprint") != uploaded:
        assert time.monotonic() < deadline, "the watcher does not remember the listing after the upload"
        time.sleep(0.5)
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


def assert_task_logs_start_quietly(workers, run_id: str) -> None:
    """TensorFlow tasks' logs carry no start-up chatter as ERROR lines (tasks.tf_logging)."""
    logs = [path for worker in workers for task in ("train", "evaluate", "publish_version")
            for path in worker.task_logs(DAG_ID, run_id, task)]
    assert logs
    for path in logs:
        errors = [line for line in path.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        chatter = [line for line in errors if any(word in line for word in CHATTER)]
        assert chatter == [], path


def failure_logs(workers: dict[str, Worker], run_id: str, instances: list[dict], dag_id: str = DAG_ID) -> str:
    """The task logs of the task instances that did not succeed, from whichever worker ran them."""
    parts = []
    for ti in instances:
        if ti["state"] in ("failed", "up_for_retry"):
            for worker in workers.values():
                for log in worker.task_logs(dag_id, run_id, ti["task_id"]):
                    parts.append(f"--- {worker.name} {log.relative_to(worker.home)}\n"
                                 + log.read_text(errors="replace")[-4000:])
    return "\n".join(parts)
