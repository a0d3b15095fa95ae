"""Feature extraction: cached-feature and augmented paths, the composed model, checkpoints and resume."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tasks import artifacts, classifier, phases, storage
from tasks.config import RunConfig
from tasks.errors import ConfigError
from tests.helpers.runs import ROOT, candidate, metrics_of, subsampled, tiny_run


def train(cfg: RunConfig) -> dict:
    """The train step for cfg's one candidate, on the tiny run's subsample."""
    from tasks.steps.train import train as train_step

    return train_step(cfg, subsampled(cfg), candidate(cfg))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One finished feature-extraction run (3 epochs, no early stop) and how many images went through the backbone."""
    cfg = tiny_run(str(tmp_path_factory.mktemp("trained")), cache_dir, epochs=3, patience=10)
    with pytest.MonkeyPatch.context() as patch:
        embedded = count_embedded(patch)
        result = train(cfg)
    return cfg, result, embedded


def count_embedded(monkeypatch) -> list[int]:
    """Spy on the backbone pass: returns a list that gets the image count of each split passed through it."""
    from tasks import activation_cache

    embedded: list[int] = []
    write_split = activation_cache._write_split

    def counting(*args, **kwargs):
        written = write_split(*args, **kwargs)
        embedded.append(written[0]["count"])  # (the split's count and shape, the images new to the store)
        return written

    monkeypatch.setattr(activation_cache, "_write_split", counting)
    return embedded


def cached_features(cfg: RunConfig) -> dict:
    """The train and val features feature extraction keeps under the run root, as its cache reads them."""
    from tasks import activation_cache

    folder = Path(cfg.artifact(artifacts.FEATURES))
    key = json.loads((folder / activation_cache.META).read_text())["key"]
    return activation_cache.open_cache(folder, key, ["train", "val"])


def test_head_trains_on_cached_features_and_writes_every_output(trained):
    cfg, result, _ = trained

    history = phases.read_history(result["history_uri"])
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert {e["phase"] for e in history} == {"feature_extraction"}
    assert result["epochs_run"] == 3 and result["resumed_from_epoch"] is None
    assert result["val_accuracy"] > 0.6  # three colours: chance is 1/3
    summary = phases.read_summary(result["summary_uri"])
    assert summary.phase == "feature_extraction" and summary.feature_dim == 1280
    assert summary.best_val_accuracy == result["val_accuracy"] and summary.epochs == 3
    assert (result["history_uri"], result["summary_uri"], result["model_uri"]) == (
        cfg.artifact(artifacts.HISTORY), cfg.artifact(artifacts.TRAIN_SUMMARY),
        cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL))
    train_features = cached_features(cfg)["train"]
    assert train_features.activations.shape == (48, 1280)
    assert list(train_features.labels) == [label for label in range(3) for _ in range(16)]
    state = storage.read_json(cfg.artifact(artifacts.checkpoints("feature_extraction"), "state.json"))
    assert state["epoch"] == 3
    assert storage.exists(cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL, classifier.WEIGHTS_FILE))
    assert _tensorboard_steps(cfg.artifact(artifacts.tensorboard("feature_extraction"), "validation"),
                              "epoch_accuracy") == [1, 2, 3]


def _tensorboard_steps(folder: str, tag: str) -> list[int]:
    import tensorflow as tf

    steps = []
    for path in storage.list_files(folder):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_composed_model_predicts_what_the_head_predicts_on_cached_features(trained):
    from tasks.predict import predict_records

    cfg, _, _ = trained
    model = classifier.load(Path(cfg.artifact(artifacts.FEATURE_EXTRACTION_MODEL)), cfg.cache_dir).model
    composed, labels, _ = predict_records(model, cfg.artifact(artifacts.split_records("val")), batch_size=5)
    cached = cached_features(cfg)["val"]
    on_features = np.asarray(model.get_layer("head")(np.asarray(cached.activations), training=False))
    assert list(cached.labels) == list(labels)
    np.testing.assert_allclose(composed, on_features, atol=1e-5)


def test_backbone_runs_once_per_image_and_a_rerun_retrains_nothing(trained, monkeypatch):
    cfg, first, embedded = trained
    assert embedded == [48, 12]  # one pass over train and val: each image once for all 3 epochs

    embedded_again = count_embedded(monkeypatch)
    again = train(cfg)  # a retry of the finished step rewrites the same outputs

    assert embedded_again == []
    assert again["epochs_run"] == 3 and again["resumed_from_epoch"] is None
    assert again["val_accuracy"] == first["val_accuracy"]


def test_the_pass_leaves_fine_tunings_boundary_activations_only_for_a_run_that_may_fine_tune(tmp_path, cache_dir,
                                                                                             monkeypatch):
    """(Each run with a feature store of its own: images another test stored come from the store, and a pass that did
    not compute them has no boundary activations to leave.)"""
    from tasks import activation_cache
    from tasks.backbone_split import cut_backbone
    from tasks.backbones import load_backbone

    monkeypatch.setenv("TLP_FEATURE_STORE", str(tmp_path / "store"))
    cfg = tiny_run(str(tmp_path / "may"), cache_dir, epochs=1)
    train(cfg)
    left = json.loads(Path(cfg.artifact(artifacts.BOUNDARY), activation_cache.META).read_text())
    split = cut_backbone(load_backbone(cfg.backbone, cfg.image_size, cache_dir=cache_dir), cfg.fine_tune_layers)
    assert (left["key"]["cut"], left["key"]["units"]) == (split.cut, split.units) and split.units > 0
    assert {name: split["count"] for name, split in left["splits"].items()} == {"train": 48, "val": 12}

    monkeypatch.setenv("TLP_FEATURE_STORE", str(tmp_path / "another-store"))
    never = tiny_run(str(tmp_path / "never"), cache_dir, epochs=1, fine_tune="never")
    train(never)
    assert storage.exists(never.artifact(artifacts.FEATURES)) and not storage.exists(never.artifact(artifacts.BOUNDARY))


def test_changed_settings_start_over_on_the_cached_features(trained, tmp_path, monkeypatch):
    cfg, _, _ = trained
    shutil.copytree(cfg.run_root, tmp_path / "runs")
    embedded = count_embedded(monkeypatch)
    changed = dataclasses.replace(cfg, run_root=str(tmp_path / "runs"), loss="categorical_crossentropy", epochs=2)
    result = train(changed)  # the loss takes one-hot labels now

    history = phases.read_history(changed.artifact(artifacts.HISTORY))
    assert [e["epoch"] for e in history] == [1, 2]
    assert result["resumed_from_epoch"] is None and result["val_accuracy"] > 0.6
    assert embedded == []


def test_corrupt_checkpoint_is_reported_and_the_phase_restarts_cleanly(trained, tmp_path, caplog):
    cfg, first, _ = trained
    shutil.copytree(cfg.run_root, tmp_path / "runs")
    corrupt = dataclasses.replace(cfg, run_root=str(tmp_path / "runs"))
    folder = corrupt.artifact(artifacts.checkpoints("feature_extraction"))
    state = storage.read_json(storage.join(folder, "state.json"))
    storage.write_bytes(storage.join(folder, state["weights"]), b"PK\x03\x04 not a zip")

    with caplog.at_level("WARNING"):
        result = train(corrupt)

    assert f"checkpoint {folder} is corrupt" in caplog.text and "starting this phase over" in caplog.text
    assert result["resumed_from_epoch"] is None and result["epochs_run"] == 3
    assert result["val_accuracy"] == first["val_accuracy"]  # the same seeded run, from the start


def test_unknown_loss_is_refused_before_any_work(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="hinge_of_fate"):
        RunConfig(run_root=str(tmp_path), loss="hinge_of_fate", cache_dir=cache_dir)


def test_augmented_path_trains_through_the_backbone_each_epoch(tmp_path, cache_dir):
    # seed 0: TensorFlow treats a (0, 0) seed pair specially; the epoch-keyed shuffles must not trip on it
    cfg = tiny_run(str(tmp_path / "runs"), cache_dir, epochs=2, augment=True, seed=0)
    result = train(cfg)

    assert result["epochs_run"] == 2
    assert not storage.exists(cfg.artifact(artifacts.FEATURES))
    model = classifier.load(Path(result["model_uri"]), cfg.cache_dir).model
    assert "augmentation" not in [layer.name for layer in model.layers]
    assert model.output_shape == (None, 3)
    assert phases.read_summary(result["summary_uri"]).settings["augment"] is True


def test_a_failed_candidate_leaves_its_error_for_select(tmp_path, cache_dir):
    cfg = tiny_run(str(tmp_path / "runs"), cache_dir, epochs=1)
    storage.write_json(cfg.artifact(artifacts.MANIFEST), {"classes": [], "hash": "tiny"})

    with pytest.raises(Exception, match="lists no classes"):
        train(cfg)

    assert "lists no classes" in storage.read_json(cfg.artifact(artifacts.TRAINING_ERROR))["error"]


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from tasks import checkpoints
    from tasks.config import RunConfig
    from tasks.steps.train import train
    from tests.helpers.runs import candidate, subsampled

    saved = checkpoints.Checkpointer.save

    def save_then_die(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        if args[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.Checkpointer.save = save_then_die
    cfg = RunConfig(**json.loads(sys.argv[1]))
    train(cfg, subsampled(cfg), candidate(cfg))
""")


@pytest.mark.slow
def test_retry_after_a_kill_resumes_from_last_epoch_with_the_uninterrupted_history(tmp_path, cache_dir, s3_bucket):
    # min_delta so large that only epoch 1 counts as an improvement: early stopping then ends
    # the run after epoch 4 only if its wait counter survived the kill after epoch 2.
    settings = dict(epochs=6, patience=3, min_delta=0.9, augment=True)
    reference_cfg = tiny_run(str(tmp_path / "reference"), cache_dir, per_class=8, **settings)
    reference = train(reference_cfg)

    cfg = tiny_run(s3_bucket, cache_dir, per_class=8, **settings)
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(cfg.to_dict())], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = storage.read_json(cfg.artifact(artifacts.checkpoints("feature_extraction"), "state.json"))
    assert state["epoch"] == 2

    resumed = train(cfg)

    assert resumed["resumed_from_epoch"] == 3
    history = storage.read_json(cfg.artifact(artifacts.HISTORY))
    expected = storage.read_json(reference_cfg.artifact(artifacts.HISTORY))
    assert [e["epoch"] for e in history["epochs"]] == [e["epoch"] for e in expected["epochs"]] == [1, 2, 3, 4]
    np.testing.assert_allclose(metrics_of(history), metrics_of(expected), rtol=1e-5, atol=1e-6)
    assert resumed["val_accuracy"] == reference["val_accuracy"]


def test_strategy_mirrors_only_across_several_gpus():
    import tensorflow as tf

    from tasks.training import strategy_for

    assert strategy_for([]) is tf.distribute.get_strategy()
    assert strategy_for(["/device:GPU:0"]) is tf.distribute.get_strategy()
    mirrored = strategy_for(["/device:GPU:0", "/device:GPU:1"])
    assert isinstance(mirrored, tf.distribute.MirroredStrategy) and mirrored.num_replicas_in_sync == 2


@pytest.mark.parametrize(("steps", "most", "expected"), [(169, 32, 13), (170, 32, 17), (64, 32, 32), (7, 32, 7),
                                                     (37, 32, 1), (1, 32, 1), (169, 256, 169), (1000, 256, 250)])
def test_several_steps_run_per_call_but_never_across_an_epoch_end(steps, most, expected):
    from tasks.training import execution_steps

    assert execution_steps(steps, most) == expected


def test_steps_run_together_end_each_epoch_on_the_very_weights_of_steps_run_one_by_one():
    """The same epochs of one stream (as fit_resumable feeds them) through a head compiled both ways: the weights
    at every epoch's end (what checkpoints and early stopping see) are the same."""
    import keras

    from tasks.activation_cache import CachedSplit
    from tasks.head import build_head
    from tasks.training import compile_model, execution_steps

    rng = np.random.default_rng(0)
    train_split = CachedSplit(rng.normal(size=(90, 16)).astype("float32"), rng.integers(0, 3, 90))
    steps = 12  # batches of 8 an epoch
    def epoch(number):
        return train_split.batches(8, 100 + number)
    assert execution_steps(steps, 32) == 12
    at_epoch_ends = {}
    for together in (False, True):
        keras.utils.set_random_seed(1)
        head = build_head((16,), 3, 0.2)
        compile_model(head, "adam", "sparse_categorical_crossentropy", 1e-2, SimpleNamespace(model=head),
                      steps if together else 1)
        ends = at_epoch_ends[together] = []
        head.fit(epoch(0).concatenate(epoch(1)).concatenate(epoch(2)), epochs=3, steps_per_epoch=steps,
                 shuffle=False, verbose=0, callbacks=[keras.callbacks.LambdaCallback(
                     on_epoch_end=lambda number, logs, head=head, ends=ends: ends.append(head.get_weights()[0]))])
    assert len(at_epoch_ends[True]) == 3
    for one_by_one, together in zip(at_epoch_ends[False], at_epoch_ends[True], strict=True):
        np.testing.assert_allclose(together, one_by_one, rtol=1e-6, atol=1e-7)
