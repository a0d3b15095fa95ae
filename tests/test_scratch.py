"""Scratch folders: removed when done, and those of killed workers removed later, never a live worker's."""
from __future__ import annotations

import os
import socket

import pytest

from tasks import scratch
from tasks.scratch import scratch_dir
from tests.helpers.scratch import dead_pid, left_behind

pytestmark = pytest.mark.fast


def test_scratch_dir_is_removed_when_the_block_ends_even_on_error(tmp_path):
    with pytest.raises(RuntimeError), scratch_dir("evaluate", tmp_path) as path:
        assert path.is_dir() and path.name.startswith("tlp-evaluate-")
        (path / "big.bin").write_bytes(b"x")
        raise RuntimeError("step failed")
    assert list(tmp_path.iterdir()) == []


def test_only_old_folders_of_processes_that_are_gone_are_removed(tmp_path):
    old = scratch.STALE_AFTER_S + 60
    gone = left_behind(tmp_path, "killed", scratch._owner(dead_pid()), old)
    reused = left_behind(tmp_path, "pid-reused", {**scratch._owner(os.getpid()), "started": -1}, old)
    running = left_behind(tmp_path, "running", scratch._owner(os.getpid()), old)
    recent = left_behind(tmp_path, "recent", scratch._owner(dead_pid()), 60)
    other_host = {**scratch._owner(dead_pid()), "host": "not-" + socket.gethostname()}
    elsewhere = left_behind(tmp_path, "other-host", other_host, old)
    unowned = left_behind(tmp_path, "unowned", None, old)
    not_scratch = tmp_path / "datasets-entry"
    not_scratch.mkdir()

    with scratch_dir("train", tmp_path) as path:
        remaining = set(tmp_path.iterdir())

    assert remaining == {path, running, recent, elsewhere, unowned, not_scratch}
    assert not gone.exists() and not reused.exists()
