"""Distributed mode without Docker: the scale-out topology as processes on loopback.

PostgreSQL (metadata DB and Celery results) and Redis (broker) from the Debian packages; the
scheduler, dag-processor, api-server and triggerer; and two Celery workers, each with its own
working directory, Airflow home, cache, temp dir and log server, as if on two machines. The
train/fine_tune/evaluate tasks go to queue `gpu` (TLP_TRAIN_QUEUE), which only worker-b serves;
everything else goes to `default`, which only worker-a serves. The dataset source, run root and
publish URI are all on SeaweedFS, and the workers get S3 credentials only through the Airflow
connection, so the only way data can cross from one worker to the other is object storage.
Then batch_predict scores an S3 prefix with the champion that run published: its score_shard tasks go to queue
`score` (TLP_SCORE_QUEUE), which both workers serve, so the two workers score shards of the one prefix.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.seaweed import free_port
from tasks import artifacts, classifier, storage
from tasks.config import RunConfig, candidate_list, safe_name
from tests.e2e.airflow_services import AirflowServices, Component
from tests.e2e.local_services import missing_packages, start_postgres, start_redis
from tests.helpers.runs import deployment_env, tiny_conf

# CI installs both packages (.ci/run), so there a missing one fails the test instead of skipping it
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(missing_packages()) and os.environ.get("CI") != "true",
    reason=f"needs the Debian packages {' '.join(missing_packages())} (.ci/run installs them)")]
DAG_ID = "transfer_learning"
TRAIN_QUEUE = "gpu"
SCORE_QUEUE = "score"
BATCH_DAG_ID = "batch_predict"
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Worker:
    """A Celery worker serving one queue from its own directory, standing in for its own machine."""

    name: str
    queue: str
    root: Path
    also_serves: tuple[str, ...] = ()

    @property
    def home(self) -> Path:
        return self.root / "airflow"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def component(self) -> Component:
        for folder in (self.home, self.cache, self.root / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        return Component(
            name=self.name,
            args=["celery", "worker", "--queues", ",".join((self.queue, *self.also_serves)), "--concurrency", "1",
                  "--celery-hostname", f"{self.name}@%h"],
            env={
                "TLP_WORKER_NAME": self.name,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "devtools.worker_identity.worker_name",
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "TLP_CACHE_DIR": str(self.cache),
                "HOME": str(self.root),
                "TMPDIR": str(self.root / "tmp"),
                **{name: None for name in AWS_VARIABLES},  # S3 only through the model_store connection
            },
            cwd=self.root,
        )

    def task_logs(self, run_id: str, task_id: str, dag_id: str = DAG_ID) -> list[Path]:
        """The task's log files that this worker wrote (Airflow writes them where the task ran)."""
        return sorted(self.home.glob(f"logs/dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/attempt=*.log"))


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
    }, extra_components=[worker.component() for worker in workers.values()])
    try:
        services.start()
        yield services
    finally:
        services.stop()


def test_run_on_two_celery_workers_shares_data_only_through_object_storage(airflow, workers, s3_bucket, tmp_path):
    conf = tiny_conf(tmp_path, "auto", publish_uri=f"{s3_bucket}/models")
    source = f"{s3_bucket}/source/"
    storage.upload(conf["source"], source)
    shutil.rmtree(conf["source"])  # no worker can read the images from a local folder
    conf["source"] = source
    airflow.wait_for_dag(DAG_ID)

    run_id = airflow.trigger(DAG_ID, conf)
    state = airflow.wait_for_run(DAG_ID, run_id, timeout_s=1200)

    instances = airflow.task_instances(DAG_ID, run_id)
    ran = {ti["task_id"]: ti for ti in instances if ti["state"] == "success"}
    summary = {ti["task_id"]: (ti["state"], ti["queue"], ti["hostname"]) for ti in instances}
    assert state == "success", f"{summary}\n{_failure_logs(workers, run_id, instances)}\n{airflow.logs()}"
    assert {ran[t]["queue"] for t in ("train", "evaluate")} == {TRAIN_QUEUE}
    assert {ran[t]["queue"] for t in ("configure", "acquire", "subsample", "candidates", "select", "decide",
                                      "publish_version", "promote")} == {"default"}
    for task_id, ti in ran.items():
        worker = workers[ti["queue"]]
        assert ti["hostname"] == worker.name, summary
        others = [other for other in workers.values() if other is not worker]
        assert worker.task_logs(run_id, task_id), f"no log of {task_id} on {worker.name}"
        assert not any(other.task_logs(run_id, task_id) for other in others), f"{task_id} also ran elsewhere"
    assert {ti["hostname"] for ti in ran.values()} == {"worker-a", "worker-b"}

    # every hand-over between the workers went through the run root on S3
    run = RunConfig.from_params(conf, run_root=f"{s3_bucket}/runs", dag_id="transfer_learning", run_id=run_id)
    run_uri, winner = run.run_uri, run.for_candidate(candidate_list(run)[0])
    handed_over = {run.artifact(artifact) for artifact in (
        *(artifacts.split_records(split) for split in ("train", "val", "test")), artifacts.METRICS)}
    handed_over |= {winner.artifact(artifacts.HISTORY), winner.artifact(artifacts.DECISION),
                    winner.artifact(artifacts.FEATURE_EXTRACTION_MODEL, classifier.WEIGHTS_FILE)}
    assert handed_over <= set(storage.list_files(run_uri + "/")), sorted(handed_over)
    champion = storage.read_json(f"{s3_bucket}/models/tiny-model/champion.json")
    assert champion["run_id"] == run_id
    assert storage.exists(f"{champion['uri']}/checksums.json")

    # each worker's local cache holds only what that worker fetched itself
    worker_a, worker_b = workers["default"], workers[TRAIN_QUEUE]
    assert any((worker_a.cache / "datasets").iterdir()), "acquire cached the S3 source on worker-a"
    assert not (worker_b.cache / "datasets").exists(), "worker-b must not hold a copy of the dataset"
    assert list(worker_b.cache.glob("efficientnet_lite0/*.npz")), "worker-b converts its own backbone weights"
    assert not (worker_a.cache / "efficientnet_lite0").exists(), "no backbone work may land in worker-a's cache"

    _two_workers_score_shards_of_one_prefix(airflow, workers, s3_bucket, tmp_path, champion)


def _two_workers_score_shards_of_one_prefix(airflow, workers: dict[str, Worker], s3_bucket: str, tmp_path: Path,
                                            champion: dict) -> None:
    """batch_predict on an S3 prefix (with two files that cannot be decoded): both workers score shards."""
    from tests.helpers.batch import UNREADABLE, batch_folder

    images = f"{s3_bucket}/new-images/"
    storage.upload(batch_folder(tmp_path / "new-images", per_class=8), images)
    airflow.wait_for_dag(BATCH_DAG_ID)
    run_id = airflow.trigger(BATCH_DAG_ID, {"images": images, "model_name": "tiny-model", "shard_size": 2,
                                            "publish_uri": f"{s3_bucket}/models"})
    state = airflow.wait_for_run(BATCH_DAG_ID, run_id, timeout_s=900)

    instances = airflow.task_instances(BATCH_DAG_ID, run_id)
    summary = [(ti["task_id"], ti["map_index"], ti["state"], ti["queue"], ti["hostname"]) for ti in instances]
    assert state == "success", f"{summary}\n{_failure_logs(workers, run_id, instances, BATCH_DAG_ID)}"
    shards = [ti for ti in instances if ti["task_id"] == "score_shard"]
    assert len(shards) == 13 and {ti["queue"] for ti in shards} == {SCORE_QUEUE}, summary  # 26 images / 2
    assert {ti["hostname"] for ti in shards} == {"worker-a", "worker-b"}, summary
    merged = storage.read_json(f"{s3_bucket}/runs-predictions/tiny-model/runs/{BATCH_DAG_ID}/"
                               f"{safe_name(run_id)}/summary.json")
    assert merged["n_scored"] == 24 and merged["n_unreadable"] == len(UNREADABLE)
    assert merged["model_version"] == champion["version"]


def _failure_logs(workers: dict[str, Worker], run_id: str, instances: list[dict], dag_id: str = DAG_ID) -> str:
    """The task logs of the task instances that did not succeed, from whichever worker ran them."""
    parts = []
    for ti in instances:
        if ti["state"] in ("failed", "up_for_retry"):
            for worker in workers.values():
                for log in worker.task_logs(run_id, ti["task_id"], dag_id):
                    parts.append(f"--- {worker.name} {log.relative_to(worker.home)}\n"
                                 + log.read_text(errors="replace")[-4000:])
    return "\n".join(parts)
