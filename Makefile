# Two commands for newcomers: `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.PHONY: install system-demo system-test system-bench test test-fast demo airflow bench clean

# Python 3.11 and the Debian packages a target needs: missing ones are installed with apt when
# root, otherwise make stops with the command to run (devtools/system_packages.py).
system-demo system-test system-bench: system-%:
	@command -v $(PYTHON) >/dev/null || { echo "tlpipe needs Python 3.11; $(PYTHON) is not on PATH: install python3.11 or run make with PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -m devtools.system_packages $*

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

test: system-test install
	$(PY) -m ruff check .
	$(PY) -m pytest -ra --durations=15 tests

# the TensorFlow-free tier, under a minute
test-fast: system-test install
	$(PY) -m pytest -ra -m fast tests

demo: system-demo install
	$(PY) -m devtools.demo run

airflow: system-demo install
	$(PY) -m devtools.demo airflow

bench: system-bench install
	$(PY) -m bench.backbones --native
	$(PY) -m bench.openclipart
	$(PY) -m bench.training
	$(PY) -m bench.candidates

clean:
	rm -rf .runs .airflow .demo .weed
