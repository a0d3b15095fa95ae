"""Shared fixtures: a project-local Airflow home, a real SeaweedFS S3 store, tiny image folders."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Airflow reads its settings at import time: set them before any test imports airflow.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="tlp-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TLP_S3_RETRY_ATTEMPTS", "2")
# tests build their SavedModel backbones anywhere; tests of the allowlist set these themselves
os.environ.setdefault("TLP_BACKBONE_LOCATIONS", "*")
os.environ.setdefault("TLP_ALLOW_HUB_BACKBONES", "true")

import pytest  # noqa: E402

from devtools import seaweed  # noqa: E402
from tasks import storage  # noqa: E402
from tests.helpers.backbones import export_saved_model  # noqa: E402
from tests.helpers.runs import write_image_folder  # noqa: E402

# fixtures shared by several modules (the api-server app) live with the helpers they use
pytest_plugins = ["tests.helpers.airflow"]


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory):
    """One real SeaweedFS (master+volume+filer+S3) on loopback for the whole session."""
    server = seaweed.start(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


@pytest.fixture
def s3(seaweed_server, monkeypatch):
    """Point storage at the SeaweedFS store; returns the server (endpoint, keys)."""
    for key, value in seaweed_server.env().items():
        monkeypatch.setenv(key, value)
    return seaweed_server


@pytest.fixture
def s3_bucket(s3, request):
    """A fresh, empty bucket named after the test; returns its s3:// URI."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    uri = f"s3://{name}"
    storage.delete(uri + "/") if _bucket_exists(uri) else storage.ensure_bucket(uri)
    return uri


def _bucket_exists(uri: str) -> bool:
    try:
        storage.list_files(uri + "/")
        return True
    except storage.StorageError:
        return False


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes, 12 train and 4 test images each."""
    write_image_folder(tmp_path / "images", {"apple": 12, "banana": 12, "cherry": 12}, splits=("train",))
    write_image_folder(tmp_path / "images", {"apple": 4, "banana": 4, "cherry": 4}, splits=("test",), seed=1)
    return tmp_path / "images"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One backbone cache (converted Lite0 weights) for the whole session."""
    return str(tmp_path_factory.mktemp("backbone-cache"))


@pytest.fixture
def saved_model(tmp_path):
    """A tiny conv net exported as a SavedModel: (the Keras source, the folder)."""
    return export_saved_model(tmp_path)


@pytest.fixture(scope="session")
def airflow_db():
    """A fresh SQLite metadata DB in this session's AIRFLOW_HOME (dag.test needs one)."""
    from airflow.utils import db

    db.initdb()


@pytest.fixture
def model_store_connection(s3, monkeypatch):
    """The DAG's `model_store` Airflow connection, pointing at the SeaweedFS store."""
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_STORE", s3.airflow_connection())
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    return s3


HEAVY_MODULES = ("tensorflow", "keras")


def pytest_ignore_collect(collection_path, config):
    """`-m fast` collects only the modules that mark tests fast: importing the others loads TensorFlow."""
    if config.getoption("markexpr") == "fast" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py":
        return "pytest.mark.fast" not in collection_path.read_text(encoding="utf-8")
    return None


@pytest.fixture(autouse=True)
def _fast_tests_load_no_tensorflow(request):
    """A test marked `fast` must not load TensorFlow or Keras (that costs seconds before it starts)."""
    loaded = {name for name in HEAVY_MODULES if name in sys.modules}
    yield
    if request.node.get_closest_marker("fast") is not None:
        new = [name for name in HEAVY_MODULES if name in sys.modules and name not in loaded]
        if new:
            pytest.fail(f"{request.node.nodeid} is marked fast but loaded {', '.join(new)}: import it lazily in the "
                        "code under test, or drop the fast mark")
