# Two commands for newcomers: `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.PHONY: install test test-fast demo airflow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

test: install
	$(PY) -m pytest -ra tests

test-fast: install
	$(PY) -m pytest -ra -m "not slow" tests

demo: install
	$(PY) -m devtools.demo run

airflow: install
	$(PY) -m devtools.demo airflow

bench: install
	$(PY) bench/backbones.py
	$(PY) bench/training.py

clean:
	rm -rf .runs .airflow .demo .weed
