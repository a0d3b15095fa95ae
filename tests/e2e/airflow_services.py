"""Start real Airflow services (api-server, scheduler, dag-processor, triggerer) on loopback for a test."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devtools.seaweed import free_port
from tests.helpers.runs import ROOT

COMPONENTS = (["api-server"], ["scheduler"], ["dag-processor"], ["triggerer"])
USER, PASSWORD = "admin", "admin-e2e"
APPROVER = "approver"  # a second user: the one who triggers a run may not approve it
PASSWORDS = {USER: PASSWORD, APPROVER: "approver-e2e"}
POLL_S = 1.0  # an API read on loopback costs milliseconds: waits end within a second of what they wait for
PARKED_SETTLE_S = 5.0  # several scheduler loops: see wait_until_parked
STOP_GRACE_S = 5.0  # api-server, scheduler and dag-processor exit within 3 s of SIGTERM; the triggerer takes 11
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Component:
    """One more process of the deployment (e.g. a Celery worker), with its own log name, environment and
    working directory; `env` is laid over the shared one and a None value removes that variable."""

    name: str
    args: list[str]
    env: dict[str, str | None] = field(default_factory=dict)
    cwd: Path | None = None


@dataclass(frozen=True)
class Worker:
    """A Celery worker serving one queue (and `also_serves`) from its own directory, standing in for its own
    machine: its own working directory, Airflow home, cache, temp dir and log server; S3 only through the
    model_store connection."""

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

    def task_logs(self, dag_id: str, run_id: str, task_id: str = "*") -> list[Path]:
        """The task's log files that this worker wrote (Airflow writes them where the task ran)."""
        return sorted(self.home.glob(f"logs/dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/attempt=*.log"))


class AirflowServices:
    """An Airflow deployment as processes; `env` is shared by every component and CLI call."""

    def __init__(self, home: Path, extra_env: dict[str, str], components=COMPONENTS,
                 extra_components: Sequence[Component] = ()):
        self.home, self.components, self.extra_components = home, components, extra_components
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps(PASSWORDS))
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            # paused: the scheduled retrain DAG must not start a default (Fashion-MNIST) run in a test
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin,{APPROVER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            **extra_env,
        }
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        migrate = subprocess.run(["airflow", "db", "migrate"], env=self.env, capture_output=True, text=True)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed ({migrate.returncode}):\n{migrate.stderr[-3000:]}")
        for component in self.components:
            self._launch(Component(component[0], component))
        for component in self.extra_components:
            self._launch(component)
        self._wait_for_api()

    def _launch(self, component: Component) -> None:
        env = {**self.env, **component.env}
        env = {key: value for key, value in env.items() if value is not None}
        log = open(self.home / f"{component.name}.log", "ab")
        self.processes.append(subprocess.Popen(["airflow", *component.args], env=env, cwd=component.cwd,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()

    def logs(self) -> str:
        """The tail of every component's log, for failure messages."""
        parts = []
        for log in sorted(self.home.glob("*.log")):
            parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def token(self, user: str = USER) -> str:
        response = self.request("POST", "/auth/token", {"username": user, "password": PASSWORDS[user]}, auth=False)
        return response["access_token"]

    def request(self, method: str, path: str, body: dict | None = None, auth: bool = True, user: str = USER):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token(user)}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def wait_for_dag(self, dag_id: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.request("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                time.sleep(POLL_S)
        raise TimeoutError(f"DAG {dag_id} was not parsed within {timeout_s}s\n{self.logs()}")

    def trigger(self, dag_id: str, conf: dict) -> str:
        """Unpause the DAG and start a run with `conf`; returns the run id."""
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        quoted = urllib.request.quote(run_id, safe="")
        while time.monotonic() < deadline:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(POLL_S)
        raise TimeoutError(f"run {run_id} did not finish within {timeout_s}s\n"
                           f"{self.task_summary(dag_id, run_id)}\n{self.logs()}")

    def wait_until_parked(self, dag_id: str, run_id: str, task_id: str, timeout_s: float) -> str:
        """Wait until the run waits for a human at `task_id`; returns the task instance's API path.

        Returns only once the same try has stayed parked (state awaiting_input) for
        PARKED_SETTLE_S. Airflow 3.3.2 loses an answer given sooner: the response re-queues the task
        under the same try number before the scheduler has handled the executor's "exited" event of
        the parking process, which then counts the resumed task as killed externally and retries it,
        and the retry asks again (seen in CI, reproduced by answering within 50 ms).
        """
        quoted = urllib.request.quote(run_id, safe="")
        instance = f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}"
        deadline = time.monotonic() + timeout_s
        parked_since: tuple[int, float] | None = None  # (try number, when first seen parked)
        while time.monotonic() < deadline:
            try:
                ti = self.request("GET", instance)
            except urllib.error.HTTPError:
                ti = None  # the task instance does not exist yet
            if ti is None or ti["state"] != "awaiting_input":
                parked_since = None
            elif parked_since is None or parked_since[0] != ti["try_number"]:
                parked_since = (ti["try_number"], time.monotonic())
            elif time.monotonic() - parked_since[1] >= PARKED_SETTLE_S:
                return instance
            time.sleep(1)
        raise TimeoutError(f"run {run_id} asked for no approval at {task_id} within {timeout_s}s\n"
                           f"{self.task_summary(dag_id, run_id)}\n{self.logs()}")

    def runs(self, dag_id: str) -> dict[str, str]:
        """{run id: state} of every run of a DAG."""
        found = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
        return {run["dag_run_id"]: run["state"] for run in found}

    def stop_runs(self, dag_id: str) -> None:
        """Pause the DAG and mark its unfinished runs failed (their running tasks are stopped)."""
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": True})
        self.fail_runs(dag_id)

    def fail_runs(self, dag_id: str, run_type: str | None = None) -> None:
        """Mark the DAG's unfinished runs (of `run_type`, or all) failed; their running tasks are stopped."""
        for run in self.run_details(dag_id):
            if run["state"] not in ("success", "failed") and run_type in (None, run["run_type"]):
                quoted = urllib.request.quote(run["dag_run_id"], safe="")
                self.request("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}", {"state": "failed"})

    def unpause(self, dag_id: str) -> None:
        """Unpause the DAG and ask the dag-processor to parse its file now: an asset's watchers start (and stop)
        only when the file of the DAG scheduled on it is parsed while that DAG is unpaused."""
        token = self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})["file_token"]
        self.request("PUT", f"/api/v2/parseDagFile/{token}")

    def asset_id(self, name: str) -> int:
        [found] = [asset for asset in self.request("GET", f"/api/v2/assets?name_pattern={name}")["assets"]
                   if asset["name"] == name]
        return found["id"]

    def asset_state(self, asset_id: int, key: str):
        """A value an asset's watcher keeps in the asset's state store; None while there is none."""
        try:
            return self.request("GET", f"/api/v2/assets/{asset_id}/state-store/{key}")["value"]
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def run_details(self, dag_id: str) -> list[dict]:
        """Every run of a DAG as the API describes it (run_type, state, conf...)."""
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def task_summary(self, dag_id: str, run_id: str) -> str:
        """One line per task instance: id, state and try number, for failure messages."""
        return "\n".join(f"{ti['task_id']}[{ti['map_index']}] {ti['state']} try {ti['try_number']}"
                         for ti in self.task_instances(dag_id, run_id))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        quoted = urllib.request.quote(run_id, safe="")
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances")["task_instances"]

    def _wait_for_api(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.base_url + "/api/v2/version", timeout=5)
                return
            except urllib.error.HTTPError:
                return  # answering, even if it wants auth
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError(f"api-server did not answer within {timeout_s}s\n{self.logs()}")
