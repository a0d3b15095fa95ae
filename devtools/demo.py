"""The local experience: `make demo` (one whole DAG run) and `make airflow` (the UI), on loopback only.

Both start a SeaweedFS S3 store, prepare a project-local AIRFLOW_HOME (SQLite),
and hand Airflow the `model_store` connection; the demo then runs the DAG in
one process with `airflow dags test` and prints what a user wants to know.
Airflow itself runs as a subprocess (its CLI), so this module imports no Airflow.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devtools import seaweed
from tasks import artifacts, settings
from tasks.config import RunConfig, check_conf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = PROJECT_ROOT / ".demo"
AIRFLOW_HOME = PROJECT_ROOT / ".airflow"
RUN_ROOT = PROJECT_ROOT / ".runs"
DAG_ID = "transfer_learning"
PUBLISH_URI = "s3://models"
UI_PORT = settings.load().ui_port
UI_USER, UI_PASSWORD = "admin", settings.load().ui_password
STOP_GRACE_S = 15.0  # the triggerer alone takes ~11 s to exit on SIGTERM


def airflow_env(store: seaweed.SeaweedServer) -> dict[str, str]:
    """Environment for every Airflow process: repo dags/plugins, local SQLite home, the model store."""
    airflow_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{airflow_bin}:{os.environ.get('PATH', '')}",  # standalone launches `airflow` from PATH
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW_CONN_MODEL_STORE": store.airflow_connection(),
        "TLP_RUN_ROOT": str(RUN_ROOT),
        "TLP_PUBLISH_URI": PUBLISH_URI,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def start_store() -> seaweed.SeaweedServer:
    """SeaweedFS with a persistent data dir, so published versions and the champion survive demo runs."""
    store = seaweed.start(STATE_DIR / "weed")
    print(f"S3 store (SeaweedFS) at {store.endpoint}, data in {store.data_dir}", flush=True)
    return store


def run_demo(conf: dict) -> int:
    """One full DAG run on the offline defaults, then a summary of its results."""
    store = start_store()
    try:
        env = airflow_env(store)
        subprocess.run(["airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        started = time.time()
        command = ["airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)]
        print("$ " + " ".join(command), flush=True)
        result = subprocess.run(command, env=env)
        print(summary(started, store), flush=True)
        return result.returncode
    finally:
        store.stop()


def summary(started: float, store: seaweed.SeaweedServer) -> str:
    """What the run produced: accuracy, the fine-tune decision, the published version, the report."""
    runs = [p for p in (RUN_ROOT / DAG_ID).glob("*") if p.is_dir() and p.stat().st_mtime >= started - 1]
    if not runs:
        return f"No run directory under {RUN_ROOT / DAG_ID} was written: see the task logs above."
    run_dir = max(runs, key=lambda p: p.stat().st_mtime)
    lines = [f"Run artifacts: {run_dir}"]
    changes = _read(run_dir, artifacts.CHANGES)
    if changes and not changes.get("train", True):  # a second `make demo` on the same data and params
        lines.append(f"Nothing trained: {changes['reason']}. To train again anyway: "
                     """.venv/bin/python -m devtools.demo run --conf '{"skip_unchanged": false}'""")
    metrics = _read(run_dir, artifacts.METRICS)
    if metrics:
        lines.append(f"Test accuracy: {metrics['accuracy']:.4f} on {metrics.get('n_test', '?')} test images")
    winner = run_dir / "candidates" / (_read(run_dir, artifacts.LEADERBOARD) or {}).get("winner", "?")
    decision = _read(winner, artifacts.DECISION)
    if decision:
        lines.append(f"Fine-tuning {'taken' if decision['fine_tune'] else 'skipped'}: {decision['reason']}")
    scores = [(phase, _read(winner, summary)) for phase, summary in (
        ("feature extraction", artifacts.TRAIN_SUMMARY), ("fine-tune", artifacts.FINE_TUNE_SUMMARY))]
    if scores[0][1]:
        lines.append("Validation accuracy: " + ", ".join(
            f"{phase} {summary['best_val_accuracy']:.4f}" for phase, summary in scores if summary)
            + f"; kept {(metrics or {}).get('kept', 'not recorded')}")
    published = _read(run_dir, artifacts.PUBLISHED)
    if published:
        state = "promoted to champion" if published.get("promoted") else "not promoted"
        lines.append(f"Published: {published['version_uri']} ({state}: {published.get('reason', '')})")
    report = run_dir.joinpath(*artifacts.REPORT.parts, artifacts.REPORT_PAGE)
    if report.exists():
        lines.append(f"Report: {report}")
    return "\n".join(lines)


def _read(folder: Path, artifact: artifacts.Artifact) -> dict | None:
    """A JSON artifact below a run (or candidate) folder, None when the step did not write it."""
    path = folder.joinpath(*artifact.parts)
    return json.loads(path.read_text()) if path.is_file() else None


def run_airflow() -> int:
    """`airflow standalone` with this repo's DAGs and plugins, sized to this machine; Ctrl-C or SIGTERM stops
    every process it started."""
    store = start_store()
    try:
        env = airflow_env(store)
        passwords = AIRFLOW_HOME / "simple_auth_manager_passwords.json"
        AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
        passwords.write_text(json.dumps({UI_USER: UI_PASSWORD}))
        env.update({
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{UI_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__PORT": str(UI_PORT),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{UI_PORT}",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism()),
        })
        print(f"Airflow UI: http://127.0.0.1:{UI_PORT}  login: {UI_USER} / {UI_PASSWORD}  "
              f"({env['AIRFLOW__CORE__PARALLELISM']} task slots)", flush=True)
        print("Trigger 'transfer_learning' with the ▶ button; the run page's 'Evaluation report' tab shows its report "
              "and release.", flush=True)
        return supervise(["airflow", "standalone"], env)
    finally:
        store.stop()


def parallelism() -> int:
    """LocalExecutor task slots: one per core this process may use (a TensorFlow task keeps a core busy), at least
    two so that a light task can run beside a training one. Airflow's default, 32, swamps a small machine."""
    return max(2, len(os.sched_getaffinity(0)))


def supervise(command: list[str], env: dict[str, str], grace_s: float = STOP_GRACE_S) -> int:
    """Run `command` in its own process group until it exits or this process gets Ctrl-C or SIGTERM; then stop
    every process it started (`airflow standalone` leaves its scheduler, api-server and triggerer running when it
    is stopped itself): SIGTERM to all, SIGKILL to whatever is left after `grace_s`."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = None
    try:
        process = subprocess.Popen(command, env=env, start_new_session=True)
        return process.wait()
    except _Stop:
        print("Stopping Airflow and everything it started …", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process is not None:
            _stop_all(process, grace_s)


class _Stop(Exception):
    """Ctrl-C or SIGTERM arrived."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def _stop_all(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process, its group and every descendant (also one that left the group); SIGKILL the rest."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    family += [p for p in psutil.process_iter() if _group_of(p) == process.pid and p not in family]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def _group_of(member) -> int | None:
    try:
        return os.getpgid(member.pid)
    except (ProcessLookupError, PermissionError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("run", help="run the DAG once with `airflow dags test` and summarise")
    demo.add_argument("--conf", default="{}", help="JSON params overriding the defaults")
    sub.add_parser("airflow", help="start airflow standalone with the repo's DAGs and plugins")
    args = parser.parse_args()
    if args.command == "run":
        conf = json.loads(args.conf)
        check_conf(conf)  # fail on unknown or bad params before starting anything
        RunConfig.from_params(conf)
        sys.exit(run_demo(conf))
    sys.exit(run_airflow())


if __name__ == "__main__":
    main()
