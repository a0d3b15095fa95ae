"""Fine-tuning: what changes (only the unfrozen top, never BatchNorm), which model is kept, resume."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.test_train import SUBSAMPLED, metrics_of, tiny_run

from tasks import artifacts, checkpoints, classifier, storage

BACKBONE = "efficientnet_lite0"
TRAINED = {"manifest_hash": SUBSAMPLED["hash"]}  # what train hands fine_tune


@pytest.fixture(scope="module")
def feature_extracted(tmp_path_factory, cache_dir):
    """A run after a deliberately short feature extraction (1 epoch), so fine-tuning has room to improve."""
    from tasks.steps.train import train

    cfg = tiny_run(str(tmp_path_factory.mktemp("phase1")), cache_dir, epochs=1, fine_tune_layers=4,
                   fine_tune_epochs=2, patience=10)
    train(cfg, SUBSAMPLED)
    return cfg


def copy_run(cfg, tmp_path, **changes):
    shutil.copytree(cfg.run_root, tmp_path / "runs")
    return dataclasses.replace(cfg, run_root=str(tmp_path / "runs"), **changes)


@pytest.fixture(scope="module")
def fine_tuned(feature_extracted, tmp_path_factory):
    from tasks.steps.fine_tune import fine_tune

    cfg = copy_run(feature_extracted, tmp_path_factory.mktemp("fine-tuned"))
    return cfg, fine_tune(cfg, TRAINED)


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
    assert split_backbone(reference, cfg.fine_tune_layers).unfrozen == result["unfrozen_layers"]
    assert result["cut"] == "block7a"  # 4 units: block7a's three convolutions and the head conv
    layers = leaves(reference.model)  # same order as the saved models' leaves; flags mark the cut
    assert len(layers) == len(before) == len(after)

    changed = [not all(np.array_equal(a, b) for a, b in zip(old, new)) for old, new in zip(before, after)]
    batchnorm = [isinstance(layer, keras.layers.BatchNormalization) for layer in layers]
    unfrozen = [layer.trainable for layer in layers]
    assert sum(unfrozen) == len(result["unfrozen_layers"]) == cfg.fine_tune_layers
    assert any(batchnorm) and not any(u and bn for u, bn in zip(unfrozen, batchnorm))
    assert not any(c for c, bn in zip(changed, batchnorm) if bn)  # gamma, beta, moving mean and variance
    assert not any(c for c, u in zip(changed, unfrozen) if not u)  # everything below the cut
    assert any(c for c, u, layer in zip(changed, unfrozen, layers) if u and isinstance(layer, keras.layers.Conv2D))


def test_history_continues_across_phases_and_the_better_model_is_kept(fine_tuned):
    cfg, result = fine_tuned

    history = storage.read_json(cfg.artifact(artifacts.HISTORY))
    assert [(e["epoch"], e["phase"]) for e in history["epochs"]] == [
        (1, "feature_extraction"), (2, "fine_tune"), (3, "fine_tune")]
    assert history["fine_tune_start_epoch"] == 2
    assert result["val_accuracy_after"] > result["val_accuracy_before"]  # 1 head epoch leaves room
    assert result["kept"] == "fine_tuned"
    assert weights_file(cfg, artifacts.MODEL) == weights_file(cfg, artifacts.FINE_TUNED_MODEL)
    summary = storage.read_json(cfg.artifact(artifacts.TRAIN_SUMMARY))
    assert summary["kept"] == "fine_tuned"
    assert summary["val_accuracy"] == {"feature_extraction": result["val_accuracy_before"],
                                       "fine_tuned": result["val_accuracy_after"]}
    assert summary["phases"]["fine_tune"]["epochs"] == 2
    assert summary["phases"]["fine_tune"]["learning_rate"] == pytest.approx(cfg.learning_rate * cfg.fine_tune_lr_factor)


def test_feature_extraction_model_stays_when_fine_tuning_does_not_beat_it(feature_extracted, tmp_path):
    from tasks.steps.fine_tune import fine_tune

    cfg = copy_run(feature_extracted, tmp_path, fine_tune_epochs=1, fine_tune_lr_factor=1e-9)
    result = fine_tune(cfg, TRAINED)

    assert result["val_accuracy_after"] == result["val_accuracy_before"]
    assert result["kept"] == "feature_extraction"
    assert weights_file(cfg, artifacts.MODEL) == weights_file(cfg, artifacts.FEATURE_EXTRACTION_MODEL)
    assert storage.exists(cfg.artifact(artifacts.FINE_TUNED_MODEL))


class Crash(RuntimeError):
    pass


def test_interrupted_fine_tuning_resumes_to_the_uninterrupted_history(feature_extracted, fine_tuned, tmp_path,
                                                                      monkeypatch):
    from tasks.steps.fine_tune import fine_tune

    cfg = copy_run(feature_extracted, tmp_path)
    saved = checkpoints.Checkpointer.save

    def save_then_crash(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        raise Crash("worker lost after the first fine-tune checkpoint")

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        fine_tune(cfg, TRAINED)
    monkeypatch.setattr(checkpoints.Checkpointer, "save", saved)

    result = fine_tune(cfg, TRAINED)

    reference_cfg, reference = fine_tuned
    assert result["resumed_from_epoch"] == 3
    history = storage.read_json(cfg.artifact(artifacts.HISTORY))
    expected = storage.read_json(reference_cfg.artifact(artifacts.HISTORY))
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    np.testing.assert_allclose(metrics_of(history), metrics_of(expected), rtol=1e-5, atol=1e-6)
    assert result["kept"] == reference["kept"]


@pytest.mark.parametrize("epochs, steps, warmup", [(7, 10, 10), (2, 10, 3), (1, 10, 2), (1, 1, 0)])
def test_a_short_fine_tune_gets_a_short_warm_up_and_still_decays(epochs, steps, warmup):
    """One epoch of warm-up, but at most 15 % of the fine-tune: a one-epoch fine-tune must not spend itself
    climbing to the full rate (it wrecked the head on a small run)."""
    from tasks.config import RunConfig
    from tasks.steps.fine_tune import learning_rate, warmup_steps

    cfg = RunConfig(fine_tune_epochs=epochs, learning_rate=1e-3, fine_tune_lr_factor=1.0)
    assert warmup_steps(epochs * steps, steps) == warmup
    schedule = learning_rate(cfg, steps)
    rates = [float(schedule(step)) for step in range(epochs * steps + 1)]
    assert rates[0] == (0.0 if warmup else pytest.approx(1e-3))
    assert max(rates) == pytest.approx(1e-3, rel=1e-5) and rates.index(max(rates)) == warmup
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)  # decayed by the end of the fine-tune
