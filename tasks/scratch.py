"""Scratch folders that a killed worker does not leave behind for ever.

A step stages models, records and downloads through a scratch folder that it
removes when it ends; a worker killed by the OOM killer or SIGKILL cannot, and
its gigabytes stay in the temp dir or the cache. Each scratch folder therefore
records its owner (host, pid and the process's start time), and every new one
first removes the folders in the same place whose owner is gone and that are
older than STALE_AFTER_S. Concurrent workers are safe: a folder whose owner is
alive, on another host, or cannot be told is kept, and so is any folder
without an owner file (made by other code, or being made right now).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger(__name__)

PREFIX = "tlp-"
OWNER_FILE = ".tlp-owner.json"
STALE_AFTER_S = 6 * 3600


@contextlib.contextmanager
def scratch_dir(name: str, parent: str | Path | None = None) -> Iterator[Path]:
    """A new folder `tlp-<name>-XXXXXXXX` in `parent` (default: the temp dir), removed when the block ends.

    Give `parent` when the result is renamed into place from the scratch
    folder (a rename only works within one filesystem).
    """
    parent = Path(parent or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{name}-", dir=parent))
    try:
        (path / OWNER_FILE).write_text(json.dumps(_owner(os.getpid())))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A file opened for writing that appears at `path` whole when the block ends, or not at all.

    It is written as a hidden temporary file next to `path` (a random name: writers
    racing on one path never share it) and renamed into place; if the block or the
    write fails (a full disk, a kill signal turned into an exception) the temporary
    file is removed, never left behind. Plain os calls, and the folder is made only
    when missing: the feature store writes thousands of small entries through here.
    """
    folder, name = os.path.split(os.fspath(path))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.part")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        os.makedirs(folder or ".", exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(descriptor, "wb") as handle:
            yield handle
        os.chmod(temporary, mode)  # readers (UI, other users) need `mode` whatever the umask
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_stale(parent: Path) -> list[Path]:
    """Remove the scratch folders in `parent` whose owning process is gone and that are older than STALE_AFTER_S."""
    removed = []
    for path in sorted(parent.glob(f"{PREFIX}*")):
        owner_file = path / OWNER_FILE
        try:
            owner = json.loads(owner_file.read_text())
            age = time.time() - owner_file.stat().st_mtime
        except (OSError, ValueError):
            continue
        if age > STALE_AFTER_S and not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d scratch folders left by processes that are gone: %s", len(removed),
                 ", ".join(str(path) for path in removed))
    return removed


def _owner(pid: int) -> dict:
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def _alive(owner: dict) -> bool:
    """False only when the owner surely is gone: on this host, and its pid is free or now another process's."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return _start_time(pid) == owner.get("started")


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux /proc), so a reused pid is told apart; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])
