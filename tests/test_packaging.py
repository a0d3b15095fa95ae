"""The project installs as a package and `make` prepares the machine by itself.

Airflow finds the DAGs and the plugin from any working directory with no PYTHONPATH and no
import-path edits (the pipeline is an installed package), and `make demo` / `make test` first
check Python and the Debian packages: apt as root, the exact command otherwise, nothing when
all is there. The machine is faked (a PATH holding fake `dpkg-query` and `apt-get`, a fake
effective uid): the real apt is never run.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import system_packages

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DIRS = ("dags", "plugins", "tasks", "tests", "bench", "devtools")
TEST_PACKAGES = ("dataset-fashion-mnist", "chromium", "docker-compose", "postgresql", "redis-server")
LOAD_DAGS_AND_PLUGINS = """
import json
from airflow import plugins_manager
from airflow.dag_processing.dagbag import DagBag
bag = DagBag()
plugins_manager.ensure_plugins_loaded()
print(json.dumps({"dags": sorted(bag.dag_ids), "dag_errors": bag.import_errors,
                  "plugins": [p["name"] for p in plugins_manager.get_plugin_info()],
                  "plugin_errors": plugins_manager.get_import_errors()}))
"""


def test_dags_and_plugin_load_from_any_directory_without_pythonpath(tmp_path):
    env = {  # the whole environment: what the README tells Airflow, nothing else
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    result = subprocess.run([sys.executable, "-c", LOAD_DAGS_AND_PLUGINS], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["dag_errors"] == {} and loaded["plugin_errors"] == {}
    assert {"transfer_learning", "transfer_learning_retrain"} <= set(loaded["dags"])
    assert "ml_reports" in loaded["plugins"]


def test_no_python_file_edits_the_import_path():
    edits = re.compile(r"\bsys\s*\.\s*path\b")
    offenders = [str(path.relative_to(ROOT)) for folder in PYTHON_DIRS for path in sorted((ROOT / folder).rglob("*.py"))
                 if edits.search(path.read_text())]
    assert offenders == [], "import the installed package instead (pip install -e .)"


# --- make: Python and Debian packages first ------------------------------------------------------

@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """Make this process see a Debian machine whose dpkg, apt and uid the test chooses."""
    bin_dir, apt_log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # nothing real: the fakes use shell builtins only

    def machine(installed: tuple[str, ...] = (), root: bool = True, apt: bool = True, dpkg: bool = True,
                apt_status: int = 0) -> Path:
        if dpkg:  # `dpkg-query --show --showformat=... NAME...` lists the installed ones as "NAME ii "
            write_script(bin_dir / "dpkg-query", 'shift 2\nfor name in "$@"; do\n'
                         f'  case " {" ".join(installed)} " in *" $name "*) echo "$name ii ";; esac\ndone')
        if apt:
            write_script(bin_dir / "apt-get", f'echo "$DEBIAN_FRONTEND $*" >> {apt_log}\nexit {apt_status}')
        monkeypatch.setattr(system_packages.os, "geteuid", lambda: 0 if root else 1000)
        monkeypatch.setattr(system_packages, "ensurepip_available", lambda: True)
        return apt_log

    return machine


def write_script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def apt_calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_missing_packages_as_root_are_installed_with_one_apt_update_then_one_install(fake_debian, capsys):
    apt_log = fake_debian(installed=("dataset-fashion-mnist", "docker-compose"), root=True)
    assert system_packages.main(["test"]) == 0
    assert apt_calls(apt_log) == [
        "noninteractive update",
        "noninteractive install -y --no-install-recommends chromium postgresql redis-server",
    ]
    assert "installing Debian packages chromium, postgresql, redis-server" in capsys.readouterr().err


def test_missing_package_without_root_exits_nonzero_printing_the_exact_command(fake_debian, capsys):
    apt_log = fake_debian(installed=(), root=False)
    assert system_packages.main(["demo"]) == 1
    assert apt_calls(apt_log) == []
    err = capsys.readouterr().err
    assert "make demo needs Debian packages that are not installed: dataset-fashion-mnist." in err
    assert "  sudo apt-get update && sudo apt-get install -y --no-install-recommends dataset-fashion-mnist\n" in err


def test_everything_installed_runs_no_apt_and_prints_nothing(fake_debian, capsys):
    apt_log = fake_debian(installed=TEST_PACKAGES, root=True)
    assert system_packages.main(["test"]) == 0
    assert system_packages.main(["demo"]) == 0
    assert apt_calls(apt_log) == [] and capsys.readouterr().err == ""


def test_root_without_apt_prints_the_command_instead_of_installing(fake_debian, capsys):
    fake_debian(installed=(), root=True, apt=False)
    assert system_packages.main(["demo"]) == 1
    command = "  apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist"
    assert command in capsys.readouterr().err


def test_failed_apt_stops_make_with_apts_exit_status(fake_debian, capsys):
    fake_debian(installed=(), root=True, apt_status=100)
    assert system_packages.main(["demo"]) == 100
    assert "`apt-get update` failed with exit status 100" in capsys.readouterr().err


def test_machine_without_dpkg_is_not_checked_and_nothing_is_installed(fake_debian, capsys):
    apt_log = fake_debian(root=True, dpkg=False)
    assert system_packages.main(["demo"]) == 0
    assert apt_calls(apt_log) == []
    assert "no dpkg on this machine" in capsys.readouterr().err


def test_demo_needs_only_the_dataset_and_test_needs_every_package_the_tests_use():
    assert system_packages.needed_packages("demo", has_ensurepip=True) == ("dataset-fashion-mnist",)
    assert system_packages.needed_packages("test", has_ensurepip=True) == TEST_PACKAGES


def test_make_test_installs_every_debian_package_a_test_asks_for():
    named = re.compile(r"(?:Debian (?:package )?|apt-get install )(?!packages?\b)([a-z0-9][a-z0-9.+-]+)")
    asked = {name for path in (ROOT / "tests").rglob("*.py") if path.name != Path(__file__).name
             for name in named.findall(path.read_text())}
    assert asked and asked <= set(system_packages.TARGETS["test"]), asked - set(system_packages.TARGETS["test"])


def test_debian_python_without_ensurepip_also_needs_its_venv_package():
    assert system_packages.needed_packages("demo", has_ensurepip=False) == ("dataset-fashion-mnist", "python3.11-venv")


def test_python_other_than_3_11_is_refused_with_how_to_point_make_at_3_11():
    problem = system_packages.python_problem((3, 12, 1), "/usr/bin/python3")
    assert "tlpipe needs Python 3.11" in problem and "/usr/bin/python3 is 3.12.1" in problem
    assert "PYTHON=/path/to/python3.11" in problem
    assert system_packages.python_problem((3, 11, 7), "/usr/bin/python3.11") is None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["demo", "test"])
def test_make_checks_the_machine_before_building_the_venv(target):
    steps = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    check = next(i for i, step in enumerate(steps) if f"-m devtools.system_packages {target}" in step)
    venv = next(i for i, step in enumerate(steps) if "-m venv" in step)
    assert check < venv


def test_ci_runs_make_test_and_installs_nothing_itself():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "make test"]
