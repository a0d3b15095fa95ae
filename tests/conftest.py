"""Shared fixtures: a project-local Airflow home, a real SeaweedFS S3 store, tiny image folders."""
from __future__ import annotations

import os
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

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from devtools import seaweed
from tasks import storage  # noqa: E402


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


def write_image_folder(root: Path, classes: dict[str, int], splits=("train", "test"), size: int = 32,
                       seed: int = 0) -> Path:
    """A `root/<split>/<class>/<n>.jpg` folder of small random JPEGs, each class its own hue."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for index, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(index * 80) % 256, (index * 150) % 256, (index * 40) % 256], dtype=np.int16)
            for n in range(count):
                noise = rng.integers(-30, 30, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n:04d}.jpg", quality=90)
    return root


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


def deployment_env(run_root: str, publish_uri: str) -> dict[str, str]:
    """The deployment settings a test run needs: where runs live, the publish location it may use, and a minimum
    test size a tiny run meets (its first model may become champion)."""
    return {"TLP_RUN_ROOT": run_root, "TLP_PUBLISH_LOCATIONS": publish_uri, "TLP_MIN_TEST_IMAGES": "1"}


def tiny_conf(tmp_path: Path, fine_tune: str, publish_uri: str) -> dict:
    """DAG params for a whole run in about a minute: 3 easy classes, 32 px, the real Lite0 backbone."""
    source = write_image_folder(tmp_path / "images", {"dark": 16, "mid": 16, "light": 16}, splits=("train", "test"))
    return {
        "source": str(source), "train_percent": 100, "val_fraction": 0.25, "backbone": "efficientnet_lite0",
        "image_size": 32, "batch_size": 16, "epochs": 2, "patience": 1, "fine_tune": fine_tune,
        "fine_tune_layers": 5, "fine_tune_epochs": 1, "top_k_wrong": 5, "model_name": "tiny-model",
        "publish_uri": publish_uri,
    }
