"""The serving check: golden batch through the rebuilt classifier and the SavedModel signature, in a fresh process."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from tasks import artifacts, classifier, images, serving_check, serving_export, storage
from tasks.errors import PublishError
from tasks.predict import predict_records
from tasks.records import write_records
from tasks.steps.evaluate import evaluate
from tests.helpers import evaluation as fx
from tests.helpers import images as image_fixtures


def tiny_classifier(cache_dir: str) -> classifier.Classifier:
    """A real classifier as train saves it: Lite0 at 32 px (random weights, fast) and a head for the 3 classes."""
    spec = classifier.ClassifierSpec("efficientnet_lite0", fx.IMAGE_SIZE, tuple(fx.CLASSES), 0.2)
    return classifier.build(spec, "none", cache_dir)


def staged(work: Path, built: classifier.Classifier) -> tuple[Path, Path, Path, np.ndarray, list[str]]:
    """(classifier folder, SavedModel, test records, probabilities, paths) as publish stages them."""
    records = work / "test.tfrecord"
    fx.write_test_records(records, work)
    folder = classifier.save(built, work / "model")
    serving_export.export(built.model, built.spec.classes, work / "saved_model")
    probabilities, _, paths = predict_records(built.model, records)
    return folder, work / "saved_model", records, probabilities, paths


def write_golden(path: Path, probabilities: np.ndarray, paths: list[str]) -> Path:
    path.write_bytes(serving_check.golden_batch(probabilities, paths, fx.IMAGE_SIZE))
    return path


def test_evaluate_keeps_the_first_test_records_and_their_probabilities_as_the_golden_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier, "fetch", fx.fetch_colour_model)
    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work")

    evaluate(cfg, *fx.handed_over(cfg))

    with np.load(io.BytesIO(storage.read_bytes(cfg.artifact(artifacts.GOLDEN)))) as golden:
        paths, probabilities = list(golden["paths"]), golden["probabilities"]
    expected, _, expected_paths = predict_records(fx.colour_model(), tmp_path / "work" / "test.tfrecord")
    assert paths == expected_paths[:serving_check.GOLDEN_SIZE] and len(paths) == len(fx.CLASSES) * fx.TEST_PER_CLASS
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_model_that_serves_what_was_evaluated_passes(tmp_path, cache_dir):
    model, saved_model, records, probabilities, paths = staged(tmp_path, tiny_classifier(cache_dir))

    checked = serving_check.check_serving(model, saved_model, write_golden(tmp_path / "golden.npz", probabilities,
                                                                           paths), records, "s3://m/v1")

    assert checked["n_images"] == len(paths) and checked["tolerance"] == serving_check.TOLERANCE
    assert set(checked["max_abs_diff"]) == {"model", "saved_model", "saved_model_bytes"}
    assert max(checked["max_abs_diff"].values()) <= serving_check.TOLERANCE


def test_answers_off_by_more_than_the_tolerance_block_publishing_naming_both_artifacts(tmp_path, cache_dir):
    model, saved_model, records, probabilities, paths = staged(tmp_path, tiny_classifier(cache_dir))
    golden = write_golden(tmp_path / "golden.npz", probabilities + 1e-3, paths)

    with pytest.raises(PublishError, match=r"serving check of s3://m/v1 failed, so it is not published: model "
                                           r"answers the golden batch up to 0\.001 away .*; saved_model answers"):
        serving_check.check_serving(model, saved_model, golden, records, "s3://m/v1")


def test_classifier_whose_weights_do_not_fit_its_spec_fails_the_fresh_process(tmp_path, cache_dir):
    model, saved_model, records, probabilities, paths = staged(tmp_path, tiny_classifier(cache_dir))
    spec = json.loads((model / classifier.SPEC_FILE).read_text())
    (model / classifier.SPEC_FILE).write_text(json.dumps({**spec, "classes": [*spec["classes"], "durian"]}))

    with pytest.raises(PublishError, match=r"(?s)model cannot be loaded and run .*does not fit the classifier .*re-run "
                                           r"the train \(and fine_tune\) step") as failure:
        serving_check.check_serving(model, saved_model, write_golden(tmp_path / "golden.npz", probabilities,
                                                                     paths), records, "s3://m/v1")

    assert "saved_model cannot" not in str(failure.value)


def test_golden_batch_of_other_test_records_is_refused(tmp_path, cache_dir):
    model, saved_model, records, probabilities, paths = staged(tmp_path, tiny_classifier(cache_dir))
    golden = write_golden(tmp_path / "golden.npz", probabilities, paths[::-1])

    with pytest.raises(PublishError, match="are not the golden batch evaluate stored; re-run evaluate"):
        serving_check.check_serving(model, saved_model, golden, records, "s3://m/v1")


def seeing_classifier(cache_dir: str) -> classifier.Classifier:
    """Lite0 with its ImageNet weights: its answers move with the pixels (a random backbone's barely do)."""
    spec = classifier.ClassifierSpec("efficientnet_lite0", fx.IMAGE_SIZE, tuple(fx.CLASSES), 0.2)
    return classifier.build(spec, "imagenet", cache_dir)


def staged_crafted(work: Path, built: classifier.Classifier, monkeypatch
                   ) -> tuple[Path, Path, np.ndarray, dict[str, bytes]]:
    """(classifier folder, test records, probabilities, files): a golden batch of every kind of image file."""
    files = image_fixtures.crafted_files()
    monkeypatch.setattr(serving_check, "GOLDEN_SIZE", len(files))  # every kind, however many there are
    records = work / "test.tfrecord"
    write_records(records, [(data, index % len(fx.CLASSES), name) for index, (name, data) in enumerate(files.items())])
    probabilities, _, paths = predict_records(built.model, records)
    write_golden(work / "golden.npz", probabilities, paths)
    return classifier.save(built, work / "model"), records, probabilities, files


def test_bytes_signature_answers_the_original_files_of_every_kind_as_evaluated(tmp_path, cache_dir, monkeypatch):
    import tensorflow as tf

    built = seeing_classifier(cache_dir)
    model, records, probabilities, files = staged_crafted(tmp_path, built, monkeypatch)
    saved_model = serving_export.export(built.model, built.spec.classes, tmp_path / "saved_model")

    checked = serving_check.check_serving(model, saved_model, tmp_path / "golden.npz", records, "s3://m/v1")

    assert checked["n_images"] == len(files)
    assert checked["max_abs_diff"]["saved_model_bytes"] <= serving_check.TOLERANCE
    serve = tf.saved_model.load(str(saved_model)).signatures[serving_export.BYTES_SIGNATURE]
    answer = serve(images=tf.constant([images.client_bytes(data) for data in files.values()]))
    np.testing.assert_allclose(answer["probabilities"].numpy(), probabilities, atol=serving_check.TOLERANCE)
    assert [label.decode() for label in answer["labels"].numpy()] == [fx.CLASSES[i] for i in probabilities.argmax(1)]


def test_bytes_signature_that_decodes_otherwise_blocks_publishing(tmp_path, cache_dir, monkeypatch):
    built = seeing_classifier(cache_dir)
    model, records, _, _ = staged_crafted(tmp_path, built, monkeypatch)
    monkeypatch.setattr(images, "BACKGROUND", (0, 0, 0))  # the graph composites onto black, evaluation onto white
    saved_model = serving_export.export(built.model, built.spec.classes, tmp_path / "saved_model")

    with pytest.raises(PublishError,
                       match=r"saved_model_bytes answers the golden batch up to .* in-graph decoder") as failure:
        serving_check.check_serving(model, saved_model, tmp_path / "golden.npz", records, "s3://m/v1")
    assert "saved_model answers" not in str(failure.value) and "model answers" not in str(failure.value)


def test_a_check_started_beside_other_work_judges_when_asked_and_dies_with_a_failure_there(tmp_path, cache_dir,
                                                                                          monkeypatch):
    model, saved_model, records, probabilities, paths = staged(tmp_path, tiny_classifier(cache_dir))
    golden = write_golden(tmp_path / "golden.npz", probabilities, paths)
    processes = []
    real_popen = serving_check.subprocess.Popen

    def recorded_popen(*args, **kwargs):
        processes.append(real_popen(*args, **kwargs))
        return processes[-1]

    monkeypatch.setattr(serving_check.subprocess, "Popen", recorded_popen)

    with serving_check.started(model, saved_model, golden, records, "s3://m/v1") as result:
        assert processes[0].poll() is None  # running while the caller works
        checked = result()
    assert max(checked["max_abs_diff"].values()) <= serving_check.TOLERANCE

    with pytest.raises(RuntimeError, match="conversion failed"):
        with serving_check.started(model, saved_model, golden, records, "s3://m/v1"):
            raise RuntimeError("conversion failed")
    assert processes[1].poll() is not None and processes[1].returncode != 0  # killed, not left running
