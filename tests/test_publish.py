"""Publish against a real SeaweedFS: verified versions, champion promotion, rollback, store failures.

Models are nearest-colour classifiers (mean pixel -> closest class colour) built by hand,
so a test chooses how many classes a model gets right and thus its exact accuracy.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, write_image_folder
from devtools import seaweed
from tasks import artifacts, publish, storage
from tasks.config import RunConfig
from tasks.errors import MissingInputError
from tasks.publish import PublishError
from tasks.records import write_records

CLASSES = ("apple", "banana", "cherry")
PER_CLASS = 4
MODEL_NAME = "tiny"
FAR_AWAY = 10_000.0  # a class colour no image is near: the model never predicts that class
LOGIT_SCALE = 1e-3


def class_colours(count: int) -> np.ndarray:
    """The base colour write_image_folder gives the i-th class (in sorted order)."""
    return np.array([[(i * 80) % 256, (i * 150) % 256, (i * 40) % 256] for i in range(count)], dtype="float32")


def colour_model(n_classes: int, correct: int, image_size: int):
    """A model that gets the first `correct` classes right and never predicts the others."""
    import keras

    colours = class_colours(n_classes)
    colours[correct:] = FAR_AWAY
    inputs = keras.Input((image_size, image_size, 3))
    dense = keras.layers.Dense(n_classes, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([colours.T * LOGIT_SCALE, -(colours ** 2).sum(axis=1) / 2 * LOGIT_SCALE])
    return model


@pytest.fixture(scope="module")
def test_records(tmp_path_factory):
    """Builds (and caches) a test split per class list: PER_CLASS small JPEGs per class."""
    root = tmp_path_factory.mktemp("splits")
    made: dict[tuple[str, ...], Path] = {}

    def records(classes: tuple[str, ...]) -> Path:
        if classes not in made:
            folder = write_image_folder(root / "-".join(classes), {name: PER_CLASS for name in classes},
                                        splits=("test",), seed=3)
            examples = [(path.read_bytes(), classes.index(path.parent.name), path.relative_to(folder).as_posix())
                        for path in sorted(folder.glob("test/*/*.jpg"))]
            made[classes] = root / f"{'-'.join(classes)}.tfrecord"
            write_records(made[classes], examples)
        return made[classes]

    return records


@pytest.fixture
def make_run(tmp_path, test_records):
    """Writes what evaluate leaves under a run root, for a model that gets `correct` classes right."""

    def make(run_id: str, publish_uri: str, *, correct: int = 3, classes: tuple[str, ...] = CLASSES,
             image_size: int = 32, run_root: str | None = None, **params) -> RunConfig:
        from tasks.predict import predict_records

        cfg = RunConfig(run_id=run_id, run_root=run_root or str(tmp_path / "runs"), publish_uri=publish_uri,
                        model_name=MODEL_NAME, classes=list(classes), image_size=image_size, **params)
        local = tmp_path / "build" / run_id
        model = colour_model(len(classes), correct, image_size)
        local.mkdir(parents=True)
        model.save(local / "model.keras")
        records = test_records(classes)
        probabilities, labels, _ = predict_records(model, records)
        manifest = {"classes": list(classes), "hash": hashlib.sha256(",".join(classes).encode()).hexdigest()}
        metrics = {"accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)), "classes": list(classes),
                   "manifest_hash": manifest["hash"], "n_test": len(labels)}
        files = {
            artifacts.MODEL.parts: (local / "model.keras").read_bytes(),
            artifacts.METRICS.parts: json.dumps(metrics).encode(),
            artifacts.MANIFEST.parts: json.dumps(manifest).encode(),
            artifacts.MODEL_CARD.parts: f"# {MODEL_NAME}\naccuracy {metrics['accuracy']:.3f}\n".encode(),
            (*artifacts.REPORT.parts, "index.html"): b"<html><body>report</body></html>",
            (*artifacts.REPORT.parts, "wrong.csv"): b"file,true,predicted,confidence\n",
            artifacts.split_records("test").parts: records.read_bytes(),
        }
        for parts, data in files.items():
            storage.write_bytes(storage.join(cfg.run_uri, *parts), data)
        return cfg

    return make


def version_objects(result: dict) -> dict[str, bytes]:
    """Every object of a published version, by relative path."""
    prefix = result["version_uri"] + "/"
    return {item[len(prefix):]: storage.read_bytes(item) for item in storage.list_files(prefix)}


def decisions_for(publish_uri: str) -> list[dict]:
    return publish.list_decisions(publish_uri, MODEL_NAME)


def test_publish_uploads_a_verified_version_and_first_model_becomes_champion(s3_bucket, make_run, tmp_path):
    import tensorflow as tf

    cfg = make_run("run-1", s3_bucket + "/registry", run_root=s3_bucket + "/runs")

    result = publish.publish(cfg, {"accuracy": 1.0})

    assert result["promoted"] and result["reason"] == "no champion yet"
    assert result["new_accuracy"] == 1.0 and result["champion_accuracy"] is None
    assert result["version_uri"] == f"{s3_bucket}/registry/{MODEL_NAME}/versions/{result['version']}"
    objects = version_objects(result)
    checksums = json.loads(objects.pop("checksums.json"))
    assert {name: hashlib.sha256(data).hexdigest() for name, data in objects.items()} == checksums
    assert {"model.keras", "metrics.json", "report/index.html", "report/wrong.csv", "model_card.md",
            "manifest.json", "params.json", "saved_model/saved_model.pb"} <= set(objects)
    assert json.loads(objects["params.json"]) == cfg.to_dict()
    champion = publish.read_champion(cfg.publish_uri, MODEL_NAME)
    assert champion["version"] == result["version"] and champion["uri"] == result["version_uri"]
    assert champion["accuracy"] == 1.0 and champion["metric"] == "accuracy" and champion["classes"] == list(CLASSES)
    assert champion["run_id"] == "run-1"
    assert storage.read_json(cfg.artifact(artifacts.PUBLISHED)) == result

    served = tf.saved_model.load(str(storage.download(champion["saved_model_uri"], tmp_path / "served")))
    pixels = np.full((1, 32, 32, 3), class_colours(3)[1], dtype="float32")
    assert int(np.argmax(served.serve(pixels))) == 1
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}", result["version"])
    [row] = publish.list_versions(cfg.publish_uri, MODEL_NAME)
    assert row["version"] == result["version"] and row["champion"] and row["accuracy"] == 1.0
    assert row["created"].startswith(f"{result['version'][:4]}-{result['version'][4:6]}-")


def test_republishing_the_same_run_reuses_its_version_and_decision(s3_bucket, make_run):
    cfg = make_run("run-1", s3_bucket)

    first = publish.publish(cfg)
    again = publish.publish(cfg)

    assert again == first
    assert len(publish.list_versions(s3_bucket, MODEL_NAME)) == 1
    assert len(decisions_for(s3_bucket)) == 1


def test_republishing_redoes_an_interrupted_upload_under_the_same_version(s3_bucket, make_run):
    cfg = make_run("run-1", s3_bucket)
    first = publish.publish(cfg)
    storage.delete(storage.join(first["version_uri"], "checksums.json"))
    storage.write_bytes(storage.join(first["version_uri"], "stray.bin"), b"left over")
    assert publish.list_versions(s3_bucket, MODEL_NAME) == []

    again = publish.publish(cfg)

    assert again["version"] == first["version"]
    assert "stray.bin" not in version_objects(again)
    publish.verify_version(again["version_uri"])


def test_better_model_is_promoted_after_rescoring_champion_on_the_same_test_split(s3_bucket, make_run):
    champion_cfg = make_run("run-old", s3_bucket, correct=2, image_size=48)
    old = publish.publish(champion_cfg)

    new = publish.publish(make_run("run-new", s3_bucket, correct=3, promotion_margin=0.2))

    assert new["promoted"] and new["champion_version"] == old["version"]
    assert new["champion_accuracy"] == pytest.approx(2 / 3) and new["new_accuracy"] == 1.0
    assert publish.read_champion(s3_bucket, MODEL_NAME)["version"] == new["version"]
    versions = publish.list_versions(s3_bucket, MODEL_NAME)
    assert [(row["champion"], row["promoted"]) for row in versions] == [(False, True), (True, True)]


@pytest.mark.parametrize("correct, margin", [(2, 0.0), (3, 0.0), (3, 0.5)], ids=["worse", "tie", "within-margin"])
def test_model_that_does_not_beat_champion_by_the_margin_is_not_promoted(s3_bucket, make_run, correct, margin):
    old = publish.publish(make_run("run-old", s3_bucket, correct=3 if margin == 0 else 2))

    new = publish.publish(make_run("run-new", s3_bucket, correct=correct, promotion_margin=margin))

    assert not new["promoted"] and "does not beat" in new["reason"]
    assert publish.read_champion(s3_bucket, MODEL_NAME)["version"] == old["version"]
    decision = decisions_for(s3_bucket)[-1]
    assert decision["kind"] == "publish" and decision["promoted"] is False
    assert decision["version"] == new["version"] and decision["champion_version"] == old["version"]
    assert decision["new_accuracy"] == new["new_accuracy"] and decision["margin"] == margin
    assert decision["champion_accuracy"] == pytest.approx(1.0 if margin == 0 else 2 / 3)
    assert decision["reason"] == new["reason"]


def test_class_set_mismatch_is_not_compared_and_promotes_only_when_forced(s3_bucket, make_run):
    old = publish.publish(make_run("run-3-classes", s3_bucket))
    two = ("apple", "banana")

    kept = publish.publish(make_run("run-2-classes", s3_bucket, classes=two))
    forced = publish.publish(make_run("run-2-forced", s3_bucket, classes=two, correct=1, force_promote=True))

    assert not kept["promoted"] and kept["champion_accuracy"] is None and "no comparison" in kept["reason"]
    assert forced["promoted"] and forced["champion_version"] == old["version"] and "force_promote" in forced["reason"]
    assert publish.read_champion(s3_bucket, MODEL_NAME)["classes"] == list(two)
    assert [(d["version"], d["promoted"]) for d in decisions_for(s3_bucket)] == [
        (old["version"], True), (kept["version"], False), (forced["version"], True)]


def test_verify_version_names_tampered_and_missing_objects(s3_bucket, make_run):
    result = publish.publish(make_run("run-1", s3_bucket))
    storage.write_bytes(storage.join(result["version_uri"], "report", "index.html"), b"<html>tampered</html>")
    storage.delete(storage.join(result["version_uri"], "model_card.md"))

    with pytest.raises(PublishError, match="model_card.md is missing; report/index.html does not match its sha256"):
        publish.verify_version(result["version_uri"])
    with pytest.raises(PublishError, match="report/index.html does not match"):
        publish.rollback(s3_bucket, MODEL_NAME, result["version"], "try a tampered version")


def test_corrupted_upload_fails_and_leaves_no_pointer_to_the_version(s3_bucket, make_run, monkeypatch):
    cfg = make_run("run-1", s3_bucket)
    real_upload = storage.upload

    def upload_then_corrupt(local, uri):
        real_upload(local, uri)
        storage.write_bytes(storage.join(uri, "metrics.json"), b'{"accuracy": 1.0}')

    monkeypatch.setattr(storage, "upload", upload_then_corrupt)

    with pytest.raises(PublishError, match="metrics.json does not match its sha256"):
        publish.publish(cfg)

    assert publish.read_champion(s3_bucket, MODEL_NAME) is None
    assert publish.list_versions(s3_bucket, MODEL_NAME) == []
    assert decisions_for(s3_bucket) == []


def test_rollback_repoints_champion_and_records_it_from_the_command_line(s3_bucket, make_run):
    first = publish.publish(make_run("run-1", s3_bucket, correct=2))
    second = publish.publish(make_run("run-2", s3_bucket, correct=3))
    cli = [sys.executable, "-m", "tasks.publish"]
    where = ["--publish-uri", s3_bucket, "--model-name", MODEL_NAME]

    done = subprocess.run([*cli, "rollback", *where, "--version", first["version"], "--reason", "bad in prod"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    unknown = subprocess.run([*cli, "rollback", *where, "--version", "nope", "--reason", "x"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    listed = subprocess.run([*cli, "list", *where], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)

    assert json.loads(done.stdout)["previous_version"] == second["version"]
    champion = publish.read_champion(s3_bucket, MODEL_NAME)
    assert champion["version"] == first["version"] and champion["accuracy"] == pytest.approx(2 / 3)
    record = decisions_for(s3_bucket)[-1]
    assert record["kind"] == "rollback" and record["reason"] == "rollback: bad in prod"
    assert record["version"] == first["version"] and record["champion_version"] == second["version"]
    assert unknown.returncode == 1 and first["version"] in unknown.stderr and second["version"] in unknown.stderr
    assert [row["champion"] for row in json.loads(listed.stdout)] == [True, False]


def test_retried_publish_does_not_undo_a_later_rollback(s3_bucket, make_run):
    first = publish.publish(make_run("run-1", s3_bucket, correct=2))
    second_cfg = make_run("run-2", s3_bucket, correct=3)
    publish.publish(second_cfg)
    publish.rollback(s3_bucket, MODEL_NAME, first["version"], "regression")

    publish.publish(second_cfg)

    assert publish.read_champion(s3_bucket, MODEL_NAME)["version"] == first["version"]


def test_missing_run_inputs_fail_before_anything_is_published(s3_bucket, make_run):
    cfg = make_run("run-1", s3_bucket)
    storage.delete(cfg.artifact(artifacts.METRICS))
    storage.delete(cfg.artifact(artifacts.split_records("test")))

    with pytest.raises(MissingInputError, match=r"metrics.json \(at .*; run evaluate first\).*test.tfrecord \(at .*; run subsample first\)"):
        publish.publish(cfg)

    assert storage.list_files(s3_bucket + "/") == []


def test_missing_bucket_is_created_and_logged(s3, make_run, caplog):
    bucket = f"s3://t-publish-created-{os.getpid()}-{time.time_ns()}"
    cfg = make_run("run-1", bucket)

    with caplog.at_level(logging.WARNING, logger="tasks.publish"):
        result = publish.publish(cfg)

    assert result["promoted"]
    assert any("did not exist and was created" in record.getMessage() for record in caplog.records)
    publish.verify_version(result["version_uri"])


def test_wrong_credentials_fail_before_anything_is_written(s3, s3_bucket, make_run, monkeypatch):
    cfg = make_run("run-1", s3_bucket)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")

    with pytest.raises(storage.StorageError, match="access denied") as failure:
        publish.publish(cfg)

    assert "not-the-secret" not in str(failure.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert storage.list_files(s3_bucket + "/") == []


def test_unreachable_endpoint_fails_with_a_clear_error_in_bounded_time(s3, make_run, monkeypatch):
    cfg = make_run("run-1", "s3://models")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_port()}")

    started = time.monotonic()
    with pytest.raises(storage.StoreUnavailableError, match="cannot reach S3 endpoint"):
        publish.publish(cfg)

    assert time.monotonic() - started < 30


def test_credentials_never_appear_in_logs_results_or_published_objects(s3, s3_bucket, make_run, caplog):
    caplog.set_level(logging.DEBUG)
    first = publish.publish(make_run("run-1", s3_bucket + "/registry", correct=2, run_root=s3_bucket + "/runs"))
    second = publish.publish(make_run("run-2", s3_bucket + "/registry", run_root=s3_bucket + "/runs"))
    rolled = publish.rollback(s3_bucket + "/registry", MODEL_NAME, first["version"], "check")

    secrets = [s3.secret_key.encode(), s3.access_key.encode()]
    published = [storage.read_bytes(item) for item in storage.list_files(s3_bucket + "/")]
    assert len(published) > 20
    assert not [data for data in published if any(secret in data for secret in secrets)]
    returned = json.dumps([first, second, rolled]).encode()
    assert not any(secret in returned for secret in secrets)
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("tasks")]
    assert ours and not [line for line in ours if s3.access_key in line or s3.secret_key in line]
    assert not [record for record in caplog.records if s3.secret_key in record.getMessage()]
