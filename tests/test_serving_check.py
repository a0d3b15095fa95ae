"""The serving check: golden batch through model.keras (safe mode) and the SavedModel signature, in a fresh process."""
from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
import pytest

from tests import evaluation_fixtures as fx
from tasks import artifacts, serving_check, storage
from tasks.errors import PublishError
from tasks.evaluate import evaluate
from tasks.predict import predict_records


@keras.saving.register_keras_serializable(package="tests")
class Brighten(keras.layers.Layer):
    """A custom layer only this test process knows: registered here, never in a fresh process."""

    def call(self, inputs):
        return inputs + 1.0


def staged(work: Path, model: keras.Model) -> tuple[Path, Path, Path, np.ndarray, list[str]]:
    """(model.keras, SavedModel, test records, probabilities, paths) as publish stages them."""
    records = work / "test.tfrecord"
    fx.write_test_records(records, work)
    model.save(work / "model.keras")
    model.export(str(work / "saved_model"), verbose=False)
    probabilities, _, paths = predict_records(model, records)
    return work / "model.keras", work / "saved_model", records, probabilities, paths


def write_golden(path: Path, probabilities: np.ndarray, paths: list[str]) -> Path:
    path.write_bytes(serving_check.golden_batch(probabilities, paths, fx.IMAGE_SIZE))
    return path


def test_evaluate_keeps_the_first_test_records_and_their_probabilities_as_the_golden_batch(tmp_path):
    cfg = fx.config(str(tmp_path / "runs"))
    fx.write_run(cfg, tmp_path / "work")

    evaluate(cfg)

    with np.load(io.BytesIO(storage.read_bytes(cfg.artifact(artifacts.GOLDEN)))) as golden:
        paths, probabilities = list(golden["paths"]), golden["probabilities"]
    expected, _, expected_paths = predict_records(fx.colour_model(), tmp_path / "work" / "test.tfrecord")
    assert paths == expected_paths[:serving_check.GOLDEN_SIZE] and len(paths) == len(fx.CLASSES) * fx.TEST_PER_CLASS
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_model_that_serves_what_was_evaluated_passes(tmp_path):
    model, saved_model, records, probabilities, paths = staged(tmp_path, fx.colour_model())

    checked = serving_check.check_serving(model, saved_model, write_golden(tmp_path / "golden.npz", probabilities,
                                                                           paths), records, "s3://m/v1")

    assert checked["n_images"] == len(paths) and checked["tolerance"] == serving_check.TOLERANCE
    assert set(checked["max_abs_diff"]) == {"model.keras", "saved_model"}
    assert max(checked["max_abs_diff"].values()) <= serving_check.TOLERANCE


def test_answers_off_by_more_than_the_tolerance_block_publishing_naming_both_artifacts(tmp_path):
    model, saved_model, records, probabilities, paths = staged(tmp_path, fx.colour_model())
    golden = write_golden(tmp_path / "golden.npz", probabilities + 1e-3, paths)

    with pytest.raises(PublishError, match=r"serving check of s3://m/v1 failed, so it is not published: model\.keras "
                                           r"answers the golden batch up to 0\.001 away .*; saved_model answers"):
        serving_check.check_serving(model, saved_model, golden, records, "s3://m/v1")


def test_model_that_loads_only_in_the_process_that_built_it_fails_the_fresh_process(tmp_path):
    built = fx.colour_model()
    model = keras.Sequential([keras.Input((fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3)), Brighten(), *built.layers])
    model_path, saved_model, records, probabilities, paths = staged(tmp_path, model)
    keras.saving.load_model(model_path)  # fine here, where Brighten is registered

    with pytest.raises(PublishError, match=r"model\.keras cannot be loaded and run \(TypeError: Could not locate "
                                           r"class 'Brighten'") as failure:
        serving_check.check_serving(model_path, saved_model, write_golden(tmp_path / "golden.npz", probabilities,
                                                                          paths), records, "s3://m/v1")

    assert "saved_model" not in str(failure.value)


def test_model_that_needs_unsafe_deserialisation_is_refused(tmp_path):
    built = fx.colour_model()
    model = keras.Sequential([keras.Input((fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3)), keras.layers.Lambda(lambda x: x * 1.0),
                              *built.layers])
    model_path, saved_model, records, probabilities, paths = staged(tmp_path, model)

    with pytest.raises(PublishError, match=r"model\.keras cannot be loaded and run .*safe_mode.*safe_mode=False cannot "
                                           r"be published"):
        serving_check.check_serving(model_path, saved_model, write_golden(tmp_path / "golden.npz", probabilities,
                                                                          paths), records, "s3://m/v1")


def test_golden_batch_of_other_test_records_is_refused(tmp_path):
    model, saved_model, records, probabilities, paths = staged(tmp_path, fx.colour_model())
    golden = write_golden(tmp_path / "golden.npz", probabilities, paths[::-1])

    with pytest.raises(PublishError, match="are not the golden batch evaluate stored; re-run evaluate"):
        serving_check.check_serving(model, saved_model, golden, records, "s3://m/v1")
