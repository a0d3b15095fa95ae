"""Fine-tuning: what changes (only the unfrozen top, never BatchNorm), what it hands evaluate, resume."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks import artifacts, checkpoints, classifier, phases, storage
from tests.helpers.runs import candidate, metrics_of, selected, subsampled, tiny_run

BACKBONE = "efficientnet_lite0"


def fine_tune(cfg) -> dict:
    """The fine_tune step on what subsample and select hand it for cfg's run."""
    from tasks.steps.fine_tune import fine_tune as fine_tune_step

    return fine_tune_step(cfg, subsampled(cfg), selected(cfg))


@pytest.fixture(scope="module")
def feature_extracted(tmp_path_factory, cache_dir):
    """A run after a deliberately short feature extraction (1 epoch), so fine-tuning has room to improve."""
    from tasks.steps.train import train

    cfg = tiny_run(str(tmp_path_factory.mktemp("phase1")), cache_dir, epochs=1, fine_tune_layers=4,
                   fine_tune_epochs=2, patience=10)
    with pytest.MonkeyPatch.context() as patch:  # a store of its own: the pass computes every image, and so leaves
        patch.setenv("TLP_FEATURE_STORE", str(tmp_path_factory.mktemp("store")))  # fine-tuning's boundary
        train(cfg, subsampled(cfg), candidate(cfg))
    return cfg


def copy_run(cfg, tmp_path, **changes):
    shutil.copytree(cfg.run_root, tmp_path / "runs")
    return dataclasses.replace(cfg, run_root=str(tmp_path / "runs"), **changes)


@pytest.fixture(scope="module")
def fine_tuned(feature_extracted, tmp_path_factory):
    cfg = copy_run(feature_extracted, tmp_path_factory.mktemp("fine-tuned"))
    return cfg, fine_tune(cfg)


def weights_file(cfg, artifact) -> bytes:
    return storage.read_bytes(cfg.artifact(artifact, classifier.WEIGHTS_FILE))


def leaves(layer) -> list:
    """The layers with weights inside a (nested) model, in model order."""
    children = getattr(layer, "layers", None)
    if children:
        return [leaf for child in children for leaf in leaves(child)]
    return [layer] if layer.weights else []


def backbone_weights(cfg, artifact) -> list[list[np.ndarray]]:
    model = classifier.load(Path(cfg.artifact(artifact)), cfg.cache_dir).model
    return [[np.array(w) for w in leaf.weights] for leaf in leaves(model.get_layer(BACKBONE))]


def test_only_unfrozen_layers_change_and_batchnorm_statistics_stay_bit_identical(fine_tuned):
    import keras

    from tasks.backbone_split import split_backbone
    from tasks.backbones import load_backbone

    cfg, result = fine_tuned
    before = backbone_weights(cfg, artifacts.FEATURE_EXTRACTION_MODEL)
    after = backbone_weights(cfg, artifacts.FINE_TUNED_MODEL)
    reference = load_backbone(BACKBONE, cfg.image_size, cfg.backbone_weights, cfg.cache_dir)
    assert split_backbone(reference, cfg.fine_tune_layers, depthwise=False).unfrozen == result["fine_tune_layers"]
    assert result["cut"] == "block7a"  # 4 units: block7a's three convolutions and the head conv
    # fine_tune_depthwise auto, 16 px images at a 32 px input: block7a's depthwise kernel is a unit but stays frozen
    assert cfg.fine_tune_depthwise == "auto" and cfg.image_size == 32
    assert result["fine_tune_layers"] == ["head_conv", "block7a/project_conv", "block7a/expand_conv"]
    layers = leaves(reference.model)  # same order as the saved models' leaves; flags mark the cut
    assert len(layers) == len(before) == len(after)

    changed = [not all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
               for old, new in zip(before, after, strict=True)]
    batchnorm = [isinstance(layer, keras.layers.BatchNormalization) for layer in layers]
    unfrozen = [layer.trainable for layer in layers]
    assert sum(unfrozen) == len(result["fine_tune_layers"]) == cfg.fine_tune_layers - 1
    assert any(batchnorm) and not any(u and bn for u, bn in zip(unfrozen, batchnorm, strict=True))
    assert not any(c for c, bn in zip(changed, batchnorm, strict=True) if bn)  # gamma, beta, moving mean and variance
    assert not any(c for c, u in zip(changed, unfrozen, strict=True) if not u)  # everything below the cut
    assert any(c for c, u, layer in zip(changed, unfrozen, layers, strict=True)
               if u and isinstance(layer, keras.layers.Conv2D))


def test_history_continues_across_phases_and_each_phase_keeps_its_own_artifacts(fine_tuned):
    cfg, result = fine_tuned

    assert [(e["epoch"], e["phase"]) for e in phases.read_history(result["history_uri"])] == [
        (2, "fine_tune"), (3, "fine_tune")]
    assert [e["phase"] for e in phases.read_history(cfg.artifact(artifacts.HISTORY))] == ["feature_extraction"]
    assert result["val_accuracy"] > result["val_accuracy_before"]  # 1 head epoch leaves room
    assert (result["model_uri"], result["history_uri"], result["summary_uri"]) == (
        cfg.artifact(artifacts.FINE_TUNED_MODEL), cfg.artifact(artifacts.FINE_TUNE_HISTORY),
        cfg.artifact(artifacts.FINE_TUNE_SUMMARY))
    assert weights_file(cfg, artifacts.FEATURE_EXTRACTION_MODEL) != weights_file(cfg, artifacts.FINE_TUNED_MODEL)
    summary = phases.read_summary(result["summary_uri"])
    assert summary.phase == "fine_tune" and summary.epochs == 2 and summary.best_val_accuracy == result["val_accuracy"]
    assert summary.settings["learning_rate"] == pytest.approx(cfg.learning_rate * cfg.fine_tune_lr_factor)
    assert phases.read_summary(cfg.artifact(artifacts.TRAIN_SUMMARY)).best_val_accuracy == \
        result["val_accuracy_before"], "train's summary is train's alone"


def test_fine_tuning_that_does_not_beat_feature_extraction_leaves_its_model_beside_it(feature_extracted, tmp_path):
    cfg = copy_run(feature_extracted, tmp_path, fine_tune_epochs=1, fine_tune_lr_factor=1e-9)
    before = weights_file(cfg, artifacts.FEATURE_EXTRACTION_MODEL)
    result = fine_tune(cfg)

    assert result["val_accuracy"] == result["val_accuracy_before"]
    assert weights_file(cfg, artifacts.FEATURE_EXTRACTION_MODEL) == before
    assert storage.exists(cfg.artifact(artifacts.FINE_TUNED_MODEL))


def test_fine_tuning_trains_on_the_boundary_feature_extraction_left_as_on_activations_of_its_own(
        feature_extracted, fine_tuned, tmp_path, monkeypatch):
    """Feature extraction's pass left the activations at fine-tuning's cut: fine-tuning runs no bottom of its own and
    trains as it does on the activations it computes when there are none, or none for its cut."""
    from tasks import activation_cache

    reference_cfg, reference = fine_tuned
    assert storage.exists(reference_cfg.artifact(artifacts.BOUNDARY))
    assert not storage.exists(reference_cfg.artifact(artifacts.ACTIVATIONS)), "the bottom did not run again"
    passes = []
    cache_activations = activation_cache.cache_activations
    monkeypatch.setattr(activation_cache, "cache_activations",
                        lambda *args, **kwargs: passes.append(args[2].name) or cache_activations(*args, **kwargs))
    cfg = copy_run(feature_extracted, tmp_path)
    storage.delete(cfg.artifact(artifacts.BOUNDARY) + "/")

    result = fine_tune(cfg)

    assert passes == [result["cut"]]
    np.testing.assert_allclose(metrics_of(storage.read_json(result["history_uri"])),
                               metrics_of(storage.read_json(reference["history_uri"])), rtol=1e-5, atol=1e-6)
    other_cut = copy_run(feature_extracted, tmp_path / "other", fine_tune_layers=1)
    assert fine_tune(other_cut)["cut"] != result["cut"]
    assert passes == [result["cut"], "head"], "a boundary left for another cut is not used"


class Crash(RuntimeError):
    pass


def test_interrupted_fine_tuning_resumes_to_the_uninterrupted_history(feature_extracted, fine_tuned, tmp_path,
                                                                      monkeypatch):
    cfg = copy_run(feature_extracted, tmp_path)
    saved = checkpoints.Checkpointer.save

    def save_then_crash(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        raise Crash("worker lost after the first fine-tune checkpoint")

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        fine_tune(cfg)
    monkeypatch.setattr(checkpoints.Checkpointer, "save", saved)

    result = fine_tune(cfg)

    reference_cfg, reference = fine_tuned
    assert result["resumed_from_epoch"] == 3
    history = storage.read_json(result["history_uri"])
    expected = storage.read_json(reference["history_uri"])
    assert [e["epoch"] for e in history["epochs"]] == [2, 3]
    np.testing.assert_allclose(metrics_of(history), metrics_of(expected), rtol=1e-5, atol=1e-6)
    assert result["val_accuracy"] == reference["val_accuracy"]


@pytest.mark.parametrize("epochs, steps, warmup", [(7, 10, 10), (2, 10, 3), (1, 10, 2), (1, 1, 0)])
def test_a_short_fine_tune_gets_a_short_warm_up_and_still_decays(epochs, steps, warmup):
    """One epoch of warm-up, but at most 15 % of the fine-tune: a one-epoch fine-tune must not spend itself
    climbing to the full rate (it wrecked the head on a small run)."""
    from tasks.steps.fine_tune import learning_rate, warmup_steps

    assert warmup_steps(epochs * steps, steps) == warmup
    schedule = learning_rate(1e-3, "cosine", epochs, steps)
    rates = [float(schedule(step)) for step in range(epochs * steps + 1)]
    assert rates[0] == (0.0 if warmup else pytest.approx(1e-3))
    assert max(rates) == pytest.approx(1e-3, rel=1e-5) and rates.index(max(rates)) == warmup
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)  # decayed by the end of the fine-tune
