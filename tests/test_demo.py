"""`make airflow` (devtools.demo): sized to the machine, and stopping it stops everything it started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.runs import ROOT

# a stand-in for `airflow standalone`: children in its group, one that left the group (setsid), and one that
# ignores SIGTERM; every pid is written down
FAMILY = """
sleep 300 & echo $! >> "$PIDS"
setsid sleep 300 & echo $! >> "$PIDS"
sh -c 'trap "" TERM; sleep 300' & echo $! >> "$PIDS"
trap "" TERM
echo $$ >> "$PIDS"
wait
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_make_airflow_leaves_no_process_it_started(tmp_path, signum):
    pids = tmp_path / "pids"
    script = ("import os, sys\nfrom devtools.demo import supervise\n"
              f"sys.exit(supervise(['sh', '-c', {FAMILY!r}], dict(os.environ), grace_s=2))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDS": str(pids)}
    runner = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) == 4):
        assert time.monotonic() < deadline, "the stand-in never started its children"
        time.sleep(0.1)
    started = [int(pid) for pid in pids.read_text().split()]
    assert all(_alive(pid) for pid in started)

    runner.send_signal(signum)
    assert runner.wait(timeout=30) == 0
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in started if _alive(pid)] == []


def test_executor_parallelism_is_sized_to_the_cores(monkeypatch):
    from devtools import demo

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert demo.parallelism() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    assert demo.parallelism() == 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert demo.parallelism() == 2


def test_the_summary_of_a_run_that_had_nothing_to_train_says_so_and_how_to_train_anyway(tmp_path, monkeypatch):
    from devtools import demo
    from tasks import artifacts, storage

    run_dir = tmp_path / demo.DAG_ID / "manual__1"
    storage.write_json(str(run_dir.joinpath(*artifacts.CHANGES.parts)), {
        "train": False, "reason": "data and config unchanged since champion v1: nothing to train"})
    monkeypatch.setattr(demo, "RUN_ROOT", tmp_path)
    lines = demo.summary(time.time() - 60, store=None).splitlines()
    assert lines[0] == f"Run artifacts: {run_dir}"
    assert lines[1].startswith("Nothing trained: data and config unchanged since champion v1: nothing to train. ")
    assert '"skip_unchanged": false' in lines[1] and len(lines) == 2
