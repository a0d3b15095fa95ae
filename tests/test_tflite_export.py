"""TFLite variants of small models: converted, scored with the LiteRT interpreter, kept or dropped, or refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks import serving_export, tflite_export
from tasks.predict import predict_records
from tasks.records import iter_records
from tests.helpers import evaluation as fx


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, float]:
    """(SavedModel export, test records, Keras accuracy) of the evaluation fixtures' colour model."""
    work = tmp_path_factory.mktemp("tflite")
    records = work / "test.tfrecord"
    fx.write_test_records(records, work)
    model = fx.colour_model()
    serving_export.export(model, tuple(fx.CLASSES), work / "saved_model")  # TFLite takes the pixel signatures
    probabilities, labels, _ = predict_records(model, records)
    return work / "saved_model", records, float((probabilities.argmax(axis=1) == labels).mean())


def test_every_variant_is_scored_with_litert_and_kept_when_it_keeps_the_accuracy(exported, tmp_path):
    saved_model, records, keras_accuracy = exported

    section, float32 = tflite_export.export_variants(saved_model, records, keras_accuracy, tmp_path / "tflite")

    assert section["status"] == "converted" and section["interpreter"].startswith("ai-edge-litert ")
    assert list(section["variants"]) == list(tflite_export.VARIANTS)
    for name, entry in section["variants"].items():
        assert entry["kept"] and entry["accuracy"] == pytest.approx(keras_accuracy)
        assert entry["n_images"] == len(fx.CLASSES) * fx.TEST_PER_CLASS and entry["latency_ms"] > 0
        assert entry["file"] == f"tflite/{name}.tflite"
        assert (tmp_path / entry["file"]).stat().st_size == entry["size_bytes"]
    scoring = section["scoring"]
    assert scoring["kept"] and scoring["max_probability_difference"] <= tflite_export.SCORING_TOLERANCE
    assert scoring["file"] == f"tflite/{tflite_export.SCORING_FILE}" and scoring["embedding_size"] > 0
    assert float32.shape == (len(fx.CLASSES) * fx.TEST_PER_CLASS, len(fx.CLASSES))
    labels = np.array([label for _, label, _ in iter_records(records)])  # file order
    assert np.mean(float32.argmax(axis=1) == labels) == section["variants"]["float32"]["accuracy"]


def test_the_scoring_model_answers_as_the_float32_variant_and_gives_embeddings(exported, tmp_path):
    from tasks.records import image_dataset

    saved_model, records, _ = exported
    pixels = next(iter(image_dataset(records, fx.IMAGE_SIZE, 5)))[0].numpy()
    float32 = tflite_export._invoke(tflite_export._interpreter(tflite_export.convert(saved_model, "float32"))[0],
                                    pixels)
    scoring = tflite_export.signature_outputs(
        tflite_export.convert(saved_model, "float32", serving_export.EMBEDDINGS_SIGNATURE), pixels)

    assert np.abs(scoring["probabilities"] - float32).max() <= tflite_export.SCORING_TOLERANCE
    assert scoring["embeddings"].shape[0] == 5 and not np.allclose(scoring["embeddings"], 0)


def test_variant_whose_accuracy_moves_more_than_half_a_point_is_measured_but_not_kept(exported, tmp_path):
    saved_model, records, keras_accuracy = exported

    section, _ = tflite_export.export_variants(saved_model, records, keras_accuracy - 0.006, tmp_path / "tflite")

    dropped = section["variants"]["float32"]
    assert not dropped["kept"] and "file" not in dropped and dropped["size_bytes"] > 0
    assert "beyond ±0.005" in dropped["reason"]
    assert not (tmp_path / "tflite").exists()


def test_model_the_converter_refuses_is_reported_as_not_convertible(exported, tmp_path):
    import tensorflow as tf

    class NeedsStringOps(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3], tf.float32)])
        def serve(self, image):
            text = tf.strings.as_string(tf.reduce_mean(image, axis=[1, 2]))
            return {"output_0": tf.nn.softmax(tf.strings.to_number(text))}

    module = NeedsStringOps()
    tf.saved_model.save(module, str(tmp_path / "saved_model"), signatures={"serving_default": module.serve})

    section, float32 = tflite_export.export_variants(tmp_path / "saved_model", exported[1], 1.0, tmp_path / "tflite")

    assert section["status"].startswith("not convertible: ConverterError")
    assert "'tf.AsString' op is neither a custom op nor a flex op" in section["status"]
    assert section["variants"] == {} and not (tmp_path / "tflite").exists() and "scoring" not in section
    assert float32 is None
