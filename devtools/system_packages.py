"""The machine set-up `make demo` and `make test` need beyond pip: Python 3.11 and Debian packages.

Make runs this first, with the Python that will build `.venv`:
`python3.11 -m devtools.system_packages demo|test|bench`. It is quick when nothing is
missing (one `dpkg-query`, no apt). Missing packages are installed with apt when
running as root; otherwise it stops at once and prints the command to run, so a
newcomer never waits for a long install that fails at the end. Standard library
only: it runs before the virtualenv exists. Tests fake the machine with a PATH of
fake `dpkg-query` and `apt-get` scripts.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Callable, Sequence

PYTHON_VERSION = (3, 11)
VENV_PACKAGE = "python3.11-venv"
PURPOSE = {
    "dataset-fashion-mnist": "Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist (demo and tests)",
    "chromium": "headless screenshot of the report view (tests/e2e/test_airflow_services.py)",
    "docker-compose": "validates docker/docker-compose.yaml (tests/test_docker.py)",
    "postgresql": "metadata database of the Airflow services e2e (tests/e2e/test_airflow_services.py)",
    "redis-server": "Celery broker of the Airflow services e2e (tests/e2e/test_airflow_services.py)",
    "openclipart-png": "public-domain clip art the openclipart benchmark is built from (bench/openclipart.py)",
    VENV_PACKAGE: "ensurepip, which Debian ships apart from Python: `python3.11 -m venv` needs it",
}
TARGETS = {
    "demo": ("dataset-fashion-mnist",),
    "test": ("dataset-fashion-mnist", "chromium", "docker-compose", "postgresql", "redis-server"),
    "bench": ("dataset-fashion-mnist", "openclipart-png"),
}


def dpkg_installed(packages: Sequence[str]) -> set[str] | None:
    """Which of `packages` dpkg reports as installed; None on a machine without dpkg (not Debian)."""
    if shutil.which("dpkg-query") is None:
        return None
    # unknown packages only print to stderr (exit 1): they are simply not installed
    listing = subprocess.run(["dpkg-query", "--show", "--showformat=${Package} ${db:Status-Abbrev}\n", *packages],
                             capture_output=True, text=True).stdout
    return {fields[0] for fields in map(str.split, listing.splitlines()) if fields[1:2] == ["ii"]}


def run_noninteractive(command: Sequence[str]) -> int:
    """Run an apt command without debconf prompts (a CI machine has no one to answer them)."""
    return subprocess.run(list(command), env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode


def apt_commands(packages: Sequence[str]) -> list[list[str]]:
    """Refresh the package lists once, then install only what is missing, nothing recommended."""
    return [["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]]


def shell_line(commands: list[list[str]], sudo: bool) -> str:
    """The commands as one line a person can paste."""
    prefix = "sudo " if sudo else ""
    return " && ".join(prefix + " ".join(command) for command in commands)


def python_problem(version: Sequence[int], executable: str) -> str | None:
    """Why this Python cannot build the project's virtualenv, or None when it can."""
    if tuple(version[:2]) == PYTHON_VERSION:
        return None
    found = ".".join(map(str, version[:3]))
    return (f"tlpipe needs Python 3.11 (requirements.lock is resolved for it); {executable} is {found}. "
            "Install python3.11 or run make with PYTHON=/path/to/python3.11.")


def ensurepip_available() -> bool:
    """False for Debian's Python until python3.11-venv is installed: `-m venv` needs ensurepip."""
    return importlib.util.find_spec("ensurepip") is not None


def needed_packages(target: str, has_ensurepip: bool) -> tuple[str, ...]:
    """The Debian packages `make <target>` needs on this machine."""
    return TARGETS[target] + (() if has_ensurepip else (VENV_PACKAGE,))


def ensure(target: str, packages: Sequence[str], say: Callable[[str], None]) -> int:
    """Install what is missing (as root with apt) or say exactly how to; the exit status for make."""
    installed = dpkg_installed(packages)
    if installed is None:
        say(f"make {target}: no dpkg on this machine, so its packages are not checked; it uses: "
            + "; ".join(f"{name} ({PURPOSE[name]})" for name in packages))
        return 0
    missing = [name for name in packages if name not in installed]
    if not missing:
        return 0
    commands = apt_commands(missing)
    is_root = os.geteuid() == 0
    if not (is_root and shutil.which("apt-get")):
        say(f"make {target} needs Debian packages that are not installed: {', '.join(missing)}.\n"
            f"Run this, then make {target} again:\n"
            f"  {shell_line(commands, sudo=not is_root)}")
        return 1
    say(f"make {target}: installing Debian packages {', '.join(missing)} with apt-get")
    for command in commands:
        status = run_noninteractive(command)
        if status != 0:
            say(f"make {target}: `{' '.join(command)}` failed with exit status {status}; fix apt, then retry")
            return status
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS), help="the make target to prepare for")
    target = parser.parse_args(argv).target
    problem = python_problem(sys.version_info, sys.executable)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    packages = needed_packages(target, has_ensurepip=ensurepip_available())
    return ensure(target, packages, say=lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
