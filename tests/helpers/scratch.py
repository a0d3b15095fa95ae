"""Scratch folders as workers leave them behind, and a pid that is surely dead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks import scratch


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def left_behind(parent: Path, name: str, owner: dict | None, age_s: float) -> Path:
    """A scratch folder as a worker leaves it, owned by `owner` (None: no owner file) and `age_s` old."""
    path = parent / f"tlp-{name}"
    (path / "model").mkdir(parents=True)
    (path / "model" / "weights.bin").write_bytes(b"\0" * 1024)
    if owner is not None:
        (path / scratch.OWNER_FILE).write_text(json.dumps(owner))
        then = time.time() - age_s
        os.utime(path / scratch.OWNER_FILE, (then, then))
    return path
