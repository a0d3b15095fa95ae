"""Publish against a real SeaweedFS: verified versions, champion promotion, approval, races, rollback, failures.

Models are nearest-colour classifiers (mean pixel -> closest class colour) built by hand,
so a test chooses how many classes a model gets right and thus its exact accuracy.
The serving check and the TFLite export run for real where a test is about them (and in
the first test); elsewhere `quick_checks` stands in for them to keep each test fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from devtools import seaweed
from tasks import approval, artifacts, classifier, pointer, registry, serving_check, storage, tflite_export
from tasks.approval import approval_request
from tasks.config import RunConfig
from tasks.errors import MissingInputError, PublishError
from tasks.records import write_records
from tasks.steps.evaluate import predictions_file
from tasks.steps.promote import promote
from tasks.steps.publish_version import publish_version
from tests.helpers.runs import ROOT, write_image_folder

CLASSES = ("apple", "banana", "cherry")
PER_CLASS = 4
MODEL_NAME = "tiny"
FAR_AWAY = 10_000.0  # a class colour no image is near: the model never predicts that class
LOGIT_SCALE = 1e-3


def class_colours(count: int) -> np.ndarray:
    """The base colour write_image_folder gives the i-th class (in sorted order)."""
    return np.array([[(i * 80) % 256, (i * 150) % 256, (i * 40) % 256] for i in range(count)], dtype="float32")


@pytest.fixture(scope="module")
def mean_colour_backbone(tmp_path_factory) -> str:
    """A SavedModel backbone whose features are an image's mean colour (scaled to [0, 1] by the registry)."""
    import tensorflow as tf

    class MeanColour(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.reduce_mean(images, axis=[1, 2])

    path = tmp_path_factory.mktemp("backbone") / "mean_colour"
    module = MeanColour()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return str(path)


def colour_classifier(backbone: str, classes: tuple[str, ...], correct: int, image_size: int, cache_dir: str):
    """A classifier (as train saves it) that gets the first `correct` classes right and never predicts the others."""
    colours = class_colours(len(classes))
    colours[correct:] = FAR_AWAY
    built = classifier.build(classifier.ClassifierSpec(backbone, image_size, classes, 0.2), "imagenet", cache_dir)
    scale = LOGIT_SCALE * 255  # the backbone's features are colours / 255
    built.head.get_layer("probabilities").set_weights([colours.T * scale,
                                                        -(colours ** 2).sum(axis=1) / 2 * LOGIT_SCALE])
    return built


@pytest.fixture(scope="module")
def test_records(tmp_path_factory):
    """Builds (and caches) a test split per class list: PER_CLASS small JPEGs per class."""
    root = tmp_path_factory.mktemp("splits")
    made: dict[tuple[tuple[str, ...], int], Path] = {}

    def records(classes: tuple[str, ...], seed: int = 3) -> Path:
        if (classes, seed) not in made:
            folder = write_image_folder(root / f"{'-'.join(classes)}-{seed}", {name: PER_CLASS for name in classes},
                                        splits=("test",), seed=seed)
            examples = [(path.read_bytes(), classes.index(path.parent.name), path.relative_to(folder).as_posix())
                        for path in sorted(folder.glob("test/*/*.jpg"))]
            made[classes, seed] = root / f"{'-'.join(classes)}-{seed}.tfrecord"
            write_records(made[classes, seed], examples)
        return made[classes, seed]

    return records


@pytest.fixture
def make_run(tmp_path, test_records, mean_colour_backbone, cache_dir, monkeypatch):
    """Writes what evaluate leaves under a run root, for a model that gets `correct` classes right.

    Runs share one test split; `selection` names a different subsample of the data around it (another
    manifest hash), as a run on other training data would have."""

    def make(run_id: str, publish_uri: str, *, correct: int = 3, classes: tuple[str, ...] = CLASSES,
             image_size: int = 32, run_root: str | None = None, selection: str = "", test_seed: int = 3,
             **params) -> RunConfig:
        from tasks.predict import predict_records

        monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", publish_uri)  # a publish location of this deployment
        cfg = RunConfig(run_id=run_id, run_root=run_root or str(tmp_path / "runs"), publish_uri=publish_uri,
                        model_name=MODEL_NAME, classes=list(classes), image_size=image_size, **params)
        local = tmp_path / "build" / run_id
        built = colour_classifier(mean_colour_backbone, tuple(classes), correct, image_size, cache_dir)
        storage.upload(classifier.save(built, local / "model"), cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL))
        records = test_records(classes, test_seed)
        probabilities, labels, paths = predict_records(built.model, records)
        manifest = {"classes": list(classes), "hash": hashlib.sha256(",".join(classes).encode() + selection.encode())
                    .hexdigest()}
        metrics = {"accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)), "classes": list(classes),
                   "manifest_hash": manifest["hash"], "n_test": len(labels)}
        files = {
            artifacts.METRICS.parts: json.dumps(metrics).encode(),
            artifacts.MANIFEST.parts: json.dumps(manifest).encode(),
            artifacts.MODEL_CARD.parts: f"# {MODEL_NAME}\naccuracy {metrics['accuracy']:.3f}\n".encode(),
            (*artifacts.REPORT.parts, "index.html"): b"<html><body>report</body></html>",
            (*artifacts.REPORT.parts, "wrong.csv"): b"file,true,predicted,confidence\n",
            artifacts.split_records("test").parts: records.read_bytes(),
            artifacts.split_records("train").parts: records.read_bytes(),  # publish embeds a sample of it
            artifacts.GOLDEN.parts: serving_check.golden_batch(probabilities, paths, image_size),
            artifacts.EVALUATED_PREDICTIONS.parts: predictions_file(probabilities, paths),
        }
        for parts, data in files.items():
            storage.write_bytes(storage.join(cfg.run_uri, *parts), data)
        return cfg

    return make


REAL_SERVING_CHECK = serving_check.started
REAL_EXPORT_VARIANTS = tflite_export.export_variants


@contextlib.contextmanager
def passed_serving_check(*args):
    yield lambda: {"max_abs_diff": {"model": 0.0, "saved_model": 0.0}, "n_images": PER_CLASS, "tolerance": 1e-4}


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch):
    """Stand-ins for the serving check and the TFLite export, which cost seconds per publish."""
    monkeypatch.setattr(serving_check, "started", passed_serving_check)
    monkeypatch.setattr(tflite_export, "export_variants", lambda *args: (
        {"status": "not convertible: skipped in this test", "variants": {}}, None))


@pytest.fixture
def real_checks(monkeypatch):
    """The real serving check (fresh process) and TFLite export, for the tests about them."""
    monkeypatch.setattr(serving_check, "started", REAL_SERVING_CHECK)
    monkeypatch.setattr(tflite_export, "export_variants", REAL_EXPORT_VARIANTS)


@pytest.fixture(autouse=True)
def policy(monkeypatch):
    """Sets the deployment's promotion policy (floor, margin) for this test."""

    def set_policy(*, margin: float = 0.0, floor: float = 0.0, alpha: float = 0.05, min_test: int = 1) -> None:
        monkeypatch.setenv("TLP_PROMOTION_MARGIN", str(margin))
        monkeypatch.setenv("TLP_MIN_ACCURACY", str(floor))
        monkeypatch.setenv("TLP_PROMOTION_ALPHA", str(alpha))
        monkeypatch.setenv("TLP_MIN_TEST_IMAGES", str(min_test))

    set_policy()
    return set_policy


@pytest.fixture
def approval_required(monkeypatch):
    """From when it is called, this deployment asks ana-id (or bea-id) to approve the model's promotions."""

    def ask() -> None:
        monkeypatch.setenv("TLP_APPROVAL_MODELS", MODEL_NAME)
        monkeypatch.setenv("TLP_APPROVERS", "ana-id,bea-id")

    return ask


def answer(cfg: RunConfig, version: str, option: str, comment: str = "", user: str | None = "ana") -> None:
    """Record what the approval task records once a human answered (or, with user=None, the request expired)."""
    from datetime import datetime, timezone

    event = {"chosen_options": [option], "params_input": {"comment": comment},
             "responded_by_user": {"id": f"{user}-id", "name": user} if user else None,
             "responded_at": datetime.now(timezone.utc), "timedout": user is None}
    approval.record_answer(cfg.publish_uri, cfg.model_name,
                           approval.answer_from_hitl(event, version=version, triggered_by="tom"))


def publish(cfg: RunConfig, evaluation: dict | None = None) -> dict:
    """Publish the run's model and promote it if it may, with no human approval (deployments that ask none)."""
    return promote(cfg, publish_version(cfg, evaluation)["version"])


def evaluation_of(cfg: RunConfig) -> dict:
    """What evaluate hands publish_version for the run make_run wrote."""
    return {"accuracy": storage.read_json(cfg.artifact(artifacts.METRICS))["accuracy"],
            "predictions_uri": cfg.artifact(artifacts.EVALUATED_PREDICTIONS)}


def scored_records(monkeypatch) -> list[int]:
    """How many images each SavedModel scoring of the judge wrote out (it writes the images it scores first)."""
    import tasks.records

    counts = []
    real = tasks.records.write_records

    def counting(path, examples):
        counts.append(real(path, examples))
        return counts[-1]

    monkeypatch.setattr(tasks.records, "write_records", counting)
    return counts


def version_objects(result: dict) -> dict[str, bytes]:
    """Every object of a published version, by relative path."""
    prefix = result["version_uri"] + "/"
    return {item[len(prefix):]: storage.read_bytes(item) for item in storage.list_files(prefix)}


def decisions_for(publish_uri: str) -> list[dict]:
    return registry.list_decisions(publish_uri, MODEL_NAME)


def test_publish_uploads_a_verified_version_and_first_model_becomes_champion(s3_bucket, make_run, tmp_path,
                                                                             real_checks):
    import tensorflow as tf

    cfg = make_run("run-1", s3_bucket + "/registry", run_root=s3_bucket + "/runs")

    result = publish(cfg, {"accuracy": 1.0})

    assert result["promoted"] and result["reason"].startswith("no champion yet")
    assert result["new_accuracy"] == 1.0 and result["champion_accuracy"] is None
    assert result["version_uri"] == f"{s3_bucket}/registry/{MODEL_NAME}/versions/{result['version']}"
    objects = version_objects(result)
    checksums = json.loads(objects.pop("checksums.json"))
    assert {name: hashlib.sha256(data).hexdigest() for name, data in objects.items()} == checksums
    assert {"model/classifier.json", "model/model.weights.h5", "metrics.json", "report/index.html", "report/wrong.csv",
            "model_card.md", "manifest.json", "params.json", "saved_model/saved_model.pb",
            "tflite/float32.tflite"} <= set(objects)
    metrics = json.loads(objects["metrics.json"])
    assert metrics["serving_check"]["n_images"] == len(CLASSES) * PER_CLASS
    assert max(metrics["serving_check"]["max_abs_diff"].values()) <= serving_check.TOLERANCE
    kept = {f"tflite/{name}.tflite" for name, entry in metrics["tflite"]["variants"].items() if entry["kept"]}
    assert metrics["tflite"]["scoring"]["kept"], metrics["tflite"]["scoring"]  # batch scoring's, with embeddings
    kept.add(metrics["tflite"]["scoring"]["file"])
    assert metrics["tflite"]["status"] == "converted" and kept == {name for name in objects if name.endswith(".tflite")}
    reference = np.load(io.BytesIO(objects["reference/embeddings.npy"]), allow_pickle=False)
    assert reference.dtype == np.float16 and len(reference) == len(CLASSES) * PER_CLASS  # the whole (small) split
    assert json.loads(objects["params.json"]) == cfg.to_dict()
    champion = registry.read_champion(cfg.publish_uri, MODEL_NAME)
    assert champion["version"] == result["version"] and champion["uri"] == result["version_uri"]
    assert champion["accuracy"] == 1.0 and champion["metric"] == "accuracy" and champion["classes"] == list(CLASSES)
    assert champion["run_id"] == "run-1"
    assert storage.read_json(cfg.artifact(artifacts.PUBLISHED)) == result

    served = tf.saved_model.load(str(storage.download(champion["saved_model_uri"], tmp_path / "served")))
    pixels = np.full((1, 32, 32, 3), class_colours(3)[1], dtype="float32")
    assert int(np.argmax(served.signatures["serve"](image=tf.constant(pixels))["output_0"])) == 1
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}", result["version"])
    [row] = registry.list_versions(cfg.publish_uri, MODEL_NAME)
    assert row["version"] == result["version"] and row["champion"] and row["accuracy"] == 1.0
    assert row["created"].startswith(f"{result['version'][:4]}-{result['version'][4:6]}-")


def test_republishing_the_same_run_reuses_its_version_and_decision(s3_bucket, make_run):
    cfg = make_run("run-1", s3_bucket)

    first = publish(cfg)
    again = publish(cfg)

    assert again == first
    assert len(registry.list_versions(s3_bucket, MODEL_NAME)) == 1
    assert len(decisions_for(s3_bucket)) == 1


def test_republishing_redoes_an_interrupted_upload_under_the_same_version(s3_bucket, make_run):
    cfg = make_run("run-1", s3_bucket)
    first = publish(cfg)
    storage.delete(storage.join(first["version_uri"], "checksums.json"))
    storage.write_bytes(storage.join(first["version_uri"], "stray.bin"), b"left over")
    assert registry.list_versions(s3_bucket, MODEL_NAME) == []

    again = publish(cfg)

    assert again["version"] == first["version"]
    assert "stray.bin" not in version_objects(again)
    registry.verify_version(again["version_uri"])


def test_better_model_is_promoted_after_rescoring_champion_through_its_saved_model(s3_bucket, make_run, policy):
    champion_cfg = make_run("run-old", s3_bucket, correct=2, image_size=48, selection="older data")
    old = publish(champion_cfg)
    policy(margin=0.2)
    # a champion without per-image predictions (published before they were kept) is scored at its own size
    storage.delete(storage.join(old["version_uri"], registry.PREDICTIONS_FILE))

    new = publish(make_run("run-new", s3_bucket, correct=3))

    assert new["promoted"] and new["champion_version"] == old["version"]
    assert new["champion_accuracy"] == pytest.approx(2 / 3) and new["new_accuracy"] == 1.0
    assert registry.read_champion(s3_bucket, MODEL_NAME)["version"] == new["version"]
    versions = registry.list_versions(s3_bucket, MODEL_NAME)
    assert [(row["champion"], row["promoted"]) for row in versions] == [(False, True), (True, True)]


def test_champion_with_recorded_predictions_on_these_images_is_not_rescored(s3_bucket, make_run, policy):
    old = publish(make_run("run-old", s3_bucket, correct=2))
    policy(margin=0.2)
    # were the champion re-scored, its SavedModel would have to load: the recorded accuracy must be enough
    storage.delete(storage.join(old["version_uri"], registry.SAVED_MODEL_DIR) + "/")

    new = publish(make_run("run-new", s3_bucket, correct=3))

    assert new["promoted"] and new["champion_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("correct, margin", [(2, 0.0), (3, 0.0), (3, 0.5)], ids=["worse", "tie", "within-margin"])
def test_model_that_does_not_beat_champion_by_the_margin_is_not_promoted(s3_bucket, make_run, policy, correct,
                                                                         margin):
    old = publish(make_run("run-old", s3_bucket, correct=3 if margin == 0 else 2))
    policy(margin=margin)

    new = publish(make_run("run-new", s3_bucket, correct=correct))

    assert not new["promoted"] and not new["eligible"] and "does not beat" in new["reason"]
    assert registry.read_champion(s3_bucket, MODEL_NAME)["version"] == old["version"]
    decision = decisions_for(s3_bucket)[-1]
    assert decision["kind"] == "publish" and decision["promoted"] is False
    assert decision["version"] == new["version"] and decision["champion_version"] == old["version"]
    assert decision["new_accuracy"] == new["new_accuracy"] and decision["margin"] == margin
    assert decision["champion_accuracy"] == pytest.approx(1.0 if margin == 0 else 2 / 3)
    assert decision["reason"] == new["reason"]


def test_class_set_mismatch_is_not_compared_and_is_promoted_only_by_hand(s3_bucket, make_run):
    old = publish(make_run("run-3-classes", s3_bucket))
    two = ("apple", "banana")

    kept = publish(make_run("run-2-classes", s3_bucket, classes=two))
    by_hand = registry.rollback(s3_bucket, MODEL_NAME, kept["version"], "class change: banana and apple only")

    assert not kept["promoted"] and kept["champion_accuracy"] is None and "no comparison" in kept["reason"]
    assert "by hand" in kept["reason"] and by_hand["previous_version"] == old["version"]
    assert registry.read_champion(s3_bucket, MODEL_NAME)["classes"] == list(two)
    assert [(d["version"], d["kind"], d["promoted"]) for d in decisions_for(s3_bucket)] == [
        (old["version"], "publish", True), (kept["version"], "publish", False), (kept["version"], "rollback", True)]


def test_model_below_the_deployment_floor_is_not_eligible_even_without_a_champion(s3_bucket, make_run, policy):
    policy(floor=0.9)

    result = publish(make_run("run-1", s3_bucket, correct=2))

    assert not result["eligible"] and not result["promoted"] and "below the deployment's floor 0.9" in result["reason"]
    assert registry.read_champion(s3_bucket, MODEL_NAME) is None
    [decision] = decisions_for(s3_bucket)
    assert decision["promoted"] is False and decision["min_accuracy"] == 0.9


def test_verify_version_names_tampered_and_missing_objects(s3_bucket, make_run):
    result = publish(make_run("run-1", s3_bucket))
    storage.write_bytes(storage.join(result["version_uri"], "report", "index.html"), b"<html>tampered</html>")
    storage.delete(storage.join(result["version_uri"], "model_card.md"))

    with pytest.raises(PublishError, match="model_card.md is missing; report/index.html does not match its sha256"):
        registry.verify_version(result["version_uri"])
    with pytest.raises(PublishError, match="report/index.html does not match"):
        registry.rollback(s3_bucket, MODEL_NAME, result["version"], "try a tampered version")


def test_corrupted_upload_fails_and_leaves_no_pointer_to_the_version(s3_bucket, make_run, monkeypatch):
    cfg = make_run("run-1", s3_bucket)
    real_upload = storage.upload

    def upload_then_corrupt(local, uri):
        real_upload(local, uri)
        storage.write_bytes(storage.join(uri, "metrics.json"), b'{"accuracy": 1.0}')

    monkeypatch.setattr(storage, "upload", upload_then_corrupt)

    with pytest.raises(PublishError, match="metrics.json does not match its sha256"):
        publish(cfg)

    assert registry.read_champion(s3_bucket, MODEL_NAME) is None
    assert registry.list_versions(s3_bucket, MODEL_NAME) == []
    assert decisions_for(s3_bucket) == []


def test_rollback_repoints_champion_and_records_it_from_the_command_line(s3_bucket, make_run):
    first = publish(make_run("run-1", s3_bucket, correct=2))
    second = publish(make_run("run-2", s3_bucket, correct=3))
    cli = [sys.executable, "-m", "tasks.registry"]
    where = ["--publish-uri", s3_bucket, "--model-name", MODEL_NAME]

    done = subprocess.run([*cli, "rollback", *where, "--version", first["version"], "--reason", "bad in prod"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    unknown = subprocess.run([*cli, "rollback", *where, "--version", "nope", "--reason", "x"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    listed = subprocess.run([*cli, "list", *where], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)

    assert json.loads(done.stdout)["previous_version"] == second["version"]
    champion = registry.read_champion(s3_bucket, MODEL_NAME)
    assert champion["version"] == first["version"] and champion["accuracy"] == pytest.approx(2 / 3)
    record = decisions_for(s3_bucket)[-1]
    assert record["kind"] == "rollback" and record["reason"] == "rollback: bad in prod"
    assert record["version"] == first["version"] and record["champion_version"] == second["version"]
    assert unknown.returncode == 1 and first["version"] in unknown.stderr and second["version"] in unknown.stderr
    assert [row["champion"] for row in json.loads(listed.stdout)] == [True, False]


def test_retried_publish_does_not_undo_a_later_rollback(s3_bucket, make_run):
    first = publish(make_run("run-1", s3_bucket, correct=2))
    second_cfg = make_run("run-2", s3_bucket, correct=3)
    publish(second_cfg)
    registry.rollback(s3_bucket, MODEL_NAME, first["version"], "regression")

    publish(second_cfg)

    assert registry.read_champion(s3_bucket, MODEL_NAME)["version"] == first["version"]


def test_missing_run_inputs_fail_before_anything_is_published(s3_bucket, make_run):
    cfg = make_run("run-1", s3_bucket)
    storage.delete(cfg.artifact(artifacts.METRICS))
    storage.delete(cfg.artifact(artifacts.split_records("test")))

    with pytest.raises(MissingInputError, match=r"metrics.json \(at .*; run evaluate first\)"
                                                r".*test.tfrecord \(at .*; run subsample first\)"):
        publish(cfg)

    assert storage.list_files(s3_bucket + "/") == []


def test_missing_bucket_is_created_and_logged(s3, make_run, caplog):
    bucket = f"s3://t-publish-created-{os.getpid()}-{time.time_ns()}"
    cfg = make_run("run-1", bucket)

    with caplog.at_level(logging.WARNING, logger="tasks.steps.publish_version"):
        result = publish(cfg)

    assert result["promoted"]
    assert any("did not exist and was created" in record.getMessage() for record in caplog.records)
    registry.verify_version(result["version_uri"])


def test_wrong_credentials_fail_before_anything_is_written(s3, s3_bucket, make_run, monkeypatch):
    cfg = make_run("run-1", s3_bucket)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")

    with pytest.raises(storage.StorageError, match="access denied") as failure:
        publish(cfg)

    assert "not-the-secret" not in str(failure.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert storage.list_files(s3_bucket + "/") == []


def test_unreachable_endpoint_fails_with_a_clear_error_in_bounded_time(s3, make_run, monkeypatch):
    cfg = make_run("run-1", "s3://models")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_port()}")

    started = time.monotonic()
    with pytest.raises(storage.StoreUnavailableError, match="cannot reach S3 endpoint"):
        publish(cfg)

    assert time.monotonic() - started < 30


def test_credentials_never_appear_in_logs_results_or_published_objects(s3, s3_bucket, make_run, caplog):
    caplog.set_level(logging.DEBUG)
    first = publish(make_run("run-1", s3_bucket + "/registry", correct=2, run_root=s3_bucket + "/runs"))
    second = publish(make_run("run-2", s3_bucket + "/registry", run_root=s3_bucket + "/runs"))
    rolled = registry.rollback(s3_bucket + "/registry", MODEL_NAME, first["version"], "check")

    secrets = [s3.secret_key.encode(), s3.access_key.encode()]
    published = [storage.read_bytes(item) for item in storage.list_files(s3_bucket + "/")]
    assert len(published) > 20
    assert not [data for data in published if any(secret in data for secret in secrets)]
    returned = json.dumps([first, second, rolled]).encode()
    assert not any(secret in returned for secret in secrets)
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("tasks")]
    assert ours and not [line for line in ours if s3.access_key in line or s3.secret_key in line]
    assert not [record for record in caplog.records if s3.secret_key in record.getMessage()]


def test_publish_version_alone_never_moves_the_champion(s3_bucket, make_run):
    old = publish(make_run("run-old", s3_bucket, correct=2))
    cfg = make_run("run-new", s3_bucket)

    published = publish_version(cfg)

    assert published["eligible"] and published["champion_version"] == old["version"]
    assert published["report_uri"] == f"{published['version_uri']}/report/index.html"
    assert "promoted" not in published and storage.read_json(cfg.artifact(artifacts.JUDGEMENT)) == published
    assert registry.read_champion(s3_bucket, MODEL_NAME)["version"] == old["version"]
    assert [d["version"] for d in decisions_for(s3_bucket)] == [old["version"]]


def test_approved_candidate_is_promoted_and_the_approver_and_comment_are_recorded(s3_bucket, make_run,
                                                                                    approval_required):
    approval_required()
    cfg = make_run("run-1", s3_bucket)
    published = publish_version(cfg)
    answer(cfg, published["version"], "Approve", "looks good on the gallery")

    result = promote(cfg, published["version"], triggered_by="tom")

    assert result["promoted"] and "approved by ana (ana-id): 'looks good on the gallery'" in result["reason"]
    [decision] = decisions_for(s3_bucket)
    assert decision["approval"]["approved"] and decision["approval"]["by"] == "ana (ana-id)"
    assert decision["approval"]["comment"] == "looks good on the gallery" and decision["promoted"]
    assert registry.read_champion(s3_bucket, MODEL_NAME)["decision"] == decision["decision"] == result["decision"]


@pytest.mark.parametrize("option, comment, user, said", [
    ("Reject", "confuses apples and cherries", "ana", "rejected by ana (ana-id): 'confuses apples and cherries'"),
    ("Reject", "", None, "the approval request expired"),
    (None, "", None, "no answer to its approval request is recorded"),
], ids=["rejected", "expired", "unanswered"])
def test_rejected_or_unanswered_candidate_is_not_promoted_and_who_said_no_is_recorded(s3_bucket, make_run,
                                                                                       approval_required, option,
                                                                                       comment, user, said):
    old = publish(make_run("run-old", s3_bucket, correct=2))
    approval_required()
    cfg = make_run("run-new", s3_bucket)
    published = publish_version(cfg)
    if option:
        answer(cfg, published["version"], option, comment, user)

    result = promote(cfg, published["version"], triggered_by="tom")

    assert published["eligible"] and not result["promoted"] and said in result["reason"]
    assert registry.read_champion(s3_bucket, MODEL_NAME)["version"] == old["version"]
    decision = decisions_for(s3_bucket)[-1]
    assert decision["version"] == published["version"] and decision["promoted"] is False
    assert decision["approval"]["approved"] is False and decision["approval"] == result["approval"]
    assert storage.read_json(cfg.artifact(artifacts.PUBLISHED)) == result


def test_approval_request_shows_champion_against_candidate_and_links_the_report(s3_bucket, make_run):
    old = publish(make_run("run-old", s3_bucket, correct=2))
    published = publish_version(make_run("run-new", s3_bucket))

    request = approval_request(published)

    assert request["subject"] == f"Promote {MODEL_NAME} {published['version']} (1.0000, champion 0.6667)?"
    body = request["body"]
    assert f"| candidate | `{published['version']}` | 1.0000 |" in body
    assert f"| champion | `{old['version']}` | 0.6667 |" in body
    assert "**Eligible**" in body and published["reason"] in body and "95% interval" in body
    assert f"- Report: {published['report_uri']}" in body.splitlines()
    assert f"- Model card: {published['model_card_uri']}" in body.splitlines()
    assert "(/ml-reports/runs/transfer_learning/run-new/eval/report/)" in body  # the report inside Airflow


def test_a_version_keeps_its_test_split_and_predictions_and_its_card_states_the_verdict(s3_bucket, make_run):
    publish(make_run("run-old", s3_bucket, correct=2))

    new = publish(make_run("run-new", s3_bucket))

    objects = version_objects(new)
    assert objects["test/test.tfrecord"] == storage.read_bytes(
        make_run("run-new", s3_bucket).artifact(artifacts.split_records("test")))
    predictions = json.loads(objects["predictions.json"])["predictions"]
    assert len(predictions) == len(CLASSES) * PER_CLASS and set(predictions.values()) == set(CLASSES)
    card = objects["model_card.md"].decode()
    assert "## Promotion" in card and "95% interval" in card and f"p = {new['p_value']:.3g}" in card
    assert new["gain"] == pytest.approx(1 / 3) and new["n_test"] == len(CLASSES) * PER_CLASS


def test_the_candidate_is_judged_on_the_champions_test_images_too(s3_bucket, make_run):
    old = publish(make_run("run-old", s3_bucket, correct=2, test_seed=5))

    new = publish(make_run("run-new", s3_bucket, test_seed=3))

    assert new["n_test"] == 2 * len(CLASSES) * PER_CLASS  # its own test split and the champion's, no image twice
    assert f"champion {old['version']}'s" in new["judged_on"] and new["champion_accuracy"] == pytest.approx(2 / 3)
    assert new["promoted"] and new["gain"] == pytest.approx(1 / 3)


def test_a_deployment_evaluation_set_is_the_ground_for_both_when_configured(s3_bucket, make_run, monkeypatch,
                                                                             tmp_path):
    folder = write_image_folder(tmp_path / "eval", {name: 2 for name in CLASSES}, splits=("all",), seed=11) / "all"
    storage.upload(folder, f"{s3_bucket}/eval/{MODEL_NAME}")
    monkeypatch.setenv("TLP_EVALUATION_SETS", f"{MODEL_NAME}={s3_bucket}/eval/{MODEL_NAME}")
    old = publish(make_run("run-old", s3_bucket, correct=2, test_seed=5))

    new = publish(make_run("run-new", s3_bucket, test_seed=3))

    for result in (old, new):
        assert result["n_test"] == 2 * len(CLASSES) and "evaluation set" in result["reason"]
    assert new["champion_accuracy"] == pytest.approx(2 / 3) and new["new_accuracy"] == 1.0


def test_the_deployment_minimum_test_size_holds_for_a_first_model(s3_bucket, make_run, policy):
    policy(min_test=100)

    result = publish(make_run("run-1", s3_bucket))

    assert not result["promoted"] and "fewer than the deployment's minimum 100" in result["reason"]
    assert registry.read_champion(s3_bucket, MODEL_NAME) is None


def racing_promotions(monkeypatch, first_writer: str) -> None:
    """Make two promote threads both read the champion before either writes, and `first_writer` write first."""
    both_read, first_written = threading.Barrier(2), threading.Event()
    waiting = {"worse", "better"}
    real_read, real_write = pointer.read, pointer.write_if

    def read(uri):
        found = real_read(uri)
        name = threading.current_thread().name
        if uri.endswith(registry.CHAMPION) and name in waiting:
            waiting.discard(name)
            both_read.wait(timeout=60)
        return found

    def write_if(uri, value, tag):
        name = threading.current_thread().name
        if uri.endswith(registry.CHAMPION) and name != first_writer:
            first_written.wait(timeout=60)
        written = real_write(uri, value, tag)
        if name == first_writer:
            first_written.set()
        return written

    monkeypatch.setattr(pointer, "read", read)
    monkeypatch.setattr(pointer, "write_if", write_if)


@pytest.mark.parametrize("first_writer", ["worse", "better"])
def test_racing_promotions_end_with_the_better_model_and_report_only_real_promotions(s3_bucket, make_run,
                                                                                      monkeypatch, first_writer):
    first = publish(make_run("run-first", s3_bucket, correct=1))
    cfgs = {"worse": make_run("run-worse", s3_bucket, correct=2), "better": make_run("run-better", s3_bucket)}
    published = {name: publish_version(cfg) for name, cfg in cfgs.items()}
    assert all(p["eligible"] and p["champion_version"] == first["version"] for p in published.values())
    racing_promotions(monkeypatch, first_writer)
    results = {}
    threads = [threading.Thread(name=name, target=lambda name=name: results.__setitem__(
        name, promote(cfgs[name], published[name]["version"]))) for name in cfgs]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    champion = registry.read_champion(s3_bucket, MODEL_NAME)
    assert champion["version"] == published["better"]["version"]
    assert results["better"]["promoted"] and results["worse"]["promoted"] == (first_writer == "worse")
    if first_writer == "better":
        assert f"the champion moved to {published['better']['version']}" in results["worse"]["reason"]
    records = {d["decision"]: d for d in decisions_for(s3_bucket)}
    chain, key = [], champion["decision"]
    while key is not None:
        chain.append(records[key]["version"])
        key = records[key]["champion_decision"]
    promoted = {d["version"] for d in records.values() if d["promoted"]}
    assert chain[-1] == first["version"] and len(chain) == len(promoted) and set(chain) == promoted
    for name, result in results.items():
        assert storage.read_json(cfgs[name].artifact(artifacts.PUBLISHED)) == result
        assert records[result["decision"]]["promoted"] == result["promoted"]


class IgnoresConditions:
    """An S3 client for a store that drops If-Match / If-None-Match and writes anyway."""

    def __init__(self, client):
        self._client = client

    def put_object(self, **request):
        request.pop("IfMatch", None)
        request.pop("IfNoneMatch", None)
        return self._client.put_object(**request)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_store_that_ignores_conditional_writes_is_refused_before_the_champion_moves(s3_bucket, make_run,
                                                                                     monkeypatch):
    real_client = storage.s3_client
    monkeypatch.setattr(storage, "s3_client", lambda: IgnoresConditions(real_client()))
    cfg = make_run("run-1", s3_bucket)

    with pytest.raises(PublishError, match="ignores conditional writes"):
        publish(cfg)

    assert registry.read_champion(s3_bucket, MODEL_NAME) is None and decisions_for(s3_bucket) == []
    assert "promoted" not in storage.read_json(cfg.artifact(artifacts.JUDGEMENT))


def test_pointer_overwritten_right_after_the_write_is_reported_as_no_promotion(s3_bucket, make_run, monkeypatch):
    old = publish(make_run("run-old", s3_bucket, correct=2))
    real_write = pointer.write_if

    def write_then_overwritten(uri, value, tag):
        written = real_write(uri, value, tag)
        storage.write_json(uri, {**value, "version": old["version"], "decision": old["decision"], "replaces": None})
        return written

    monkeypatch.setattr(pointer, "write_if", write_then_overwritten)

    result = publish(make_run("run-new", s3_bucket))

    assert not result["promoted"] and "another writer overwrote it" in result["reason"]
    assert decisions_for(s3_bucket)[-1]["promoted"] is False


def test_retry_after_a_crash_between_pointer_and_record_records_the_promotion_once(s3_bucket, make_run,
                                                                                    monkeypatch):
    cfg = make_run("run-1", s3_bucket)
    real_record = registry.record

    def crash(model_root, decision):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(registry, "record", crash)
    with pytest.raises(RuntimeError):
        publish(cfg)
    monkeypatch.setattr(registry, "record", real_record)
    assert registry.read_champion(s3_bucket, MODEL_NAME) is not None and decisions_for(s3_bucket) == []

    result = publish(cfg)

    [decision] = decisions_for(s3_bucket)
    assert result["promoted"] and decision["promoted"]
    assert decision["decision"] == registry.read_champion(s3_bucket, MODEL_NAME)["decision"] == result["decision"]


def test_the_judge_takes_evaluated_answers_the_published_model_is_shown_to_give(s3_bucket, make_run, real_checks,
                                                                              monkeypatch):
    cfg = make_run("run-1", s3_bucket, correct=2)
    scorings = scored_records(monkeypatch)

    result = publish(cfg, evaluation_of(cfg))

    assert scorings == []  # the candidate's SavedModel was not run over the test split again
    assert result["new_accuracy"] == pytest.approx(2 / 3) == evaluation_of(cfg)["accuracy"]
    predictions = json.loads(version_objects(result)["predictions.json"])["predictions"]
    assert len(predictions) == len(CLASSES) * PER_CLASS and set(predictions.values()) == set(CLASSES[:2])


def test_evaluated_answers_the_published_model_does_not_give_are_not_believed(s3_bucket, make_run, real_checks,
                                                                               monkeypatch, caplog):
    cfg = make_run("run-1", s3_bucket, correct=2)
    with np.load(io.BytesIO(storage.read_bytes(cfg.artifact(artifacts.EVALUATED_PREDICTIONS)))) as stored:
        paths = list(stored["paths"])
    labels = [CLASSES.index(path.split("/")[-2]) for path in paths]  # test/<class>/<n>.jpg
    storage.write_bytes(cfg.artifact(artifacts.EVALUATED_PREDICTIONS),
                        predictions_file(np.eye(len(CLASSES), dtype="float32")[labels], paths))  # all right
    scorings = scored_records(monkeypatch)

    with caplog.at_level(logging.INFO, logger="tasks.steps.publish_version"):
        result = publish(cfg, evaluation_of(cfg))

    assert scorings == [len(CLASSES) * PER_CLASS]  # judged through its SavedModel on every image instead
    assert result["new_accuracy"] == pytest.approx(2 / 3)
    assert "not by evaluate's predictions: the float32 TFLite variant answers up to" in caplog.text


def test_serving_check_failure_blocks_publishing_and_names_the_artifacts(s3_bucket, make_run, real_checks):
    cfg = make_run("run-1", s3_bucket)
    with np.load(io.BytesIO(storage.read_bytes(cfg.artifact(artifacts.GOLDEN)))) as golden:
        paths, probabilities = list(golden["paths"]), golden["probabilities"]
    storage.write_bytes(cfg.artifact(artifacts.GOLDEN),
                        serving_check.golden_batch(probabilities[:, ::-1], paths, cfg.image_size))

    with pytest.raises(PublishError, match=r"serving check of .* failed, so it is not published: model answers"
                                           r".*; saved_model answers"):
        publish(cfg)

    assert registry.list_versions(s3_bucket, MODEL_NAME) == [] and registry.read_champion(s3_bucket, MODEL_NAME) is None
