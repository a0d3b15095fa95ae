"""Quiet TensorFlow's start-up chatter on workers without a GPU, hiding nothing real.

TensorFlow and LiteRT write to the process's stderr from C++, partly before absl logging
is initialised (so TF_CPP_MIN_LOG_LEVEL cannot stop it), and Airflow logs every stderr line
of a task as ERROR: a CPU worker's task log opened with red lines about missing CUDA
drivers, CPU instructions and absl, and every TFLite scoring logged "INFO: Created
TensorFlow Lite XNNPACK delegate" as an error.

`install()` makes the process's first `import tensorflow` (direct, or through keras) run
with stderr captured at the file-descriptor level, device discovery included; `quiet_stderr`
does the same around any other noisy call (a LiteRT interpreter). Captured lines known to be
chatter are dropped, `INFO:` lines go to logging at INFO, and every other line is written
back to stderr unchanged, so a genuine error still reaches the task log as ERROR. The CUDA
lines count as chatter only on a machine without an NVIDIA driver: on a GPU worker they are
real. Python exceptions and log records do not pass through here at all.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

NOISY_MODULES = ("tensorflow",)
CHATTER = re.compile("|".join((
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$",
    r"oneDNN custom operations are on",
    r"TF-TRT Warning: Could not find TensorRT",
)))
CPU_ONLY_CHATTER = re.compile("|".join((
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.",
    r"cuda_platform\.cc:\d+\] failed call to cuInit",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
)))
INFO_LINE = re.compile(r"^INFO: (.*)$")
NVIDIA_DRIVER = ("/proc/driver/nvidia/version", "/dev/nvidiactl")


def install() -> None:
    """Quiet the first `import tensorflow` of this process (idempotent; imports nothing heavy itself)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's own INFO lines, once its logging is up
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Capture what is written to file descriptor 2 inside the block, then pass on only what is not chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            replay(captured.read().decode("utf-8", errors="replace"))


def replay(text: str, gpu_host: bool | None = None) -> None:
    """Pass on captured stderr: chatter dropped, `INFO:` lines to logging, everything else back to stderr."""
    gpu_host = has_nvidia_driver() if gpu_host is None else gpu_host
    for line in text.splitlines():
        if not line.strip() or CHATTER.search(line) or (not gpu_host and CPU_ONLY_CHATTER.search(line)):
            continue
        info = INFO_LINE.match(line)
        if info:
            log.info("%s", info.group(1))
        else:
            sys.stderr.write(line + "\n")
    sys.stderr.flush()


def has_nvidia_driver() -> bool:
    return any(os.path.exists(path) for path in NVIDIA_DRIVER)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once (then leaves sys.meta_path) and wraps its loader in `quiet_stderr`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in NOISY_MODULES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """The module's own loader, run inside `quiet_stderr` together with device discovery (which logs too)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with quiet_stderr():
            self._loader.exec_module(module)
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "list_physical_devices"):
                config.list_physical_devices()
