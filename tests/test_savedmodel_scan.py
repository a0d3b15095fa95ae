"""A SavedModel whose graph touches files or runs Python is refused before anything loads or runs it."""
from __future__ import annotations

import pytest
import tensorflow as tf

from tasks.errors import BackboneError
from tasks.savedmodel_scan import FORBIDDEN_OPS, check_saved_model

SPEC = [tf.TensorSpec([None, 4], tf.float32)]


def export(module: tf.Module, path) -> str:
    tf.saved_model.save(module, str(path), signatures=module.__call__.get_concrete_function(*SPEC))
    return str(path)


class Plain(tf.Module):
    def __init__(self):
        self.w = tf.Variable(tf.ones([4, 2]))

    @tf.function(input_signature=SPEC)
    def __call__(self, x):
        return tf.matmul(x, self.w)


class Exfiltrating(Plain):
    def __init__(self, secret: str, leak: str):
        super().__init__()
        self.secret, self.leak = secret, leak

    @tf.function(input_signature=SPEC)
    def __call__(self, x):
        tf.io.write_file(self.leak, tf.io.read_file(self.secret))
        return tf.matmul(x, self.w)


class Nested(Plain):
    """The file read hides two function calls deep."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    @tf.function
    def inner(self, x):
        return x + tf.cast(tf.strings.length(tf.io.read_file(self.secret)), tf.float32) * 0.0

    @tf.function(input_signature=SPEC)
    def __call__(self, x):
        return tf.matmul(self.inner(x), self.w)


class Python(Plain):
    @tf.function(input_signature=SPEC)
    def __call__(self, x):
        return tf.matmul(tf.numpy_function(lambda v: v, [x], tf.float32), self.w)


def test_a_plain_saved_model_passes_the_scan(tmp_path):
    check_saved_model(export(Plain(), tmp_path / "plain"))


def test_a_graph_that_copies_a_secret_is_refused_before_it_runs(tmp_path):
    secret, leak = tmp_path / "secret", tmp_path / "leak"
    secret.write_text("AIRFLOW__API_AUTH__JWT_SECRET=hunter2")
    path = export(Exfiltrating(str(secret), str(leak)), tmp_path / "evil")
    with pytest.raises(BackboneError, match="ReadFile.*WriteFile|WriteFile.*ReadFile") as refused:
        check_saved_model(path)
    assert "nothing was loaded" in str(refused.value) and not leak.exists()


def test_file_ops_inside_nested_functions_are_found(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    with pytest.raises(BackboneError, match="ReadFile in function"):
        check_saved_model(export(Nested(str(secret)), tmp_path / "nested"))


def test_python_ops_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="PyFunc"):
        check_saved_model(export(Python(), tmp_path / "python"))


def test_the_forbidden_list_covers_every_registered_file_python_and_rpc_op():
    from tensorflow.python.framework import op_def_registry

    registered = {name for name in dir(tf.raw_ops) if op_def_registry.get(name) is not None}
    io_like = {name for name in registered if name.startswith(("Read", "Write", "Matching", "Rpc", "Debug"))
               and name not in ("ReadVariableOp", "ReadVariableXlaSplitND")}
    io_like |= {name for name in registered if "PyFunc" in name or "Summary" in name and name.startswith("Write")}
    assert io_like <= FORBIDDEN_OPS


def test_an_exfiltrating_backbone_is_refused_before_its_first_forward_pass(tmp_path, monkeypatch):
    from tasks.backbones import load_backbone

    monkeypatch.setenv("TLP_BACKBONE_LOCATIONS", str(tmp_path))
    secret, leak = tmp_path / "secret", tmp_path / "leak"
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2")
    path = export(Exfiltrating(str(secret), str(leak)), tmp_path / "evil")
    with pytest.raises(BackboneError, match="is refused"):
        load_backbone(path, 32)
    assert not leak.exists()


@pytest.mark.parametrize("where", ["serving check", "TFLite conversion", "champion re-scoring"])
def test_every_place_that_loads_a_saved_model_scans_it_first(where, tmp_path):
    import numpy as np

    from tasks import promotion, serving_check, tflite_export

    secret, leak = tmp_path / "secret", tmp_path / "leak"
    secret.write_text("x")
    path = export(Exfiltrating(str(secret), str(leak)), tmp_path / "version" / "saved_model")
    load = {"serving check": lambda: serving_check._saved_model_probabilities(path, np.zeros((1, 4), "float32")),
            "TFLite conversion": lambda: tflite_export.convert(path, "float32"),
            "champion re-scoring": lambda: promotion.score_missing(
                str(tmp_path / "version" / "saved_model"), ["a"],
                promotion.JudgingSet({"k": (b"", "a", "x.png")}, "", ""), {}, 1, tmp_path / "scratch")}
    with pytest.raises(BackboneError, match="is refused"):
        load[where]()
    assert not leak.exists()
