"""Warm start: the champion's head is reused when it fits the run's classes and frozen backbone, never otherwise;
a fine-tuned champion lends its fine-tuned top (and head) to fine-tuning when its frozen bottom is this run's."""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tasks import classifier, registry, storage
from tasks.backbone_split import split_backbone
from tasks.classifier import ClassifierSpec
from tasks.errors import StorageError
from tasks.feature_store import weights_digest
from tasks.warm_start import champion_head, champion_top, warm_start, warm_start_top

pytestmark = pytest.mark.slow

SPEC = ClassifierSpec("efficientnet_lite0", 32, ("a", "b", "c"), 0.2)
VERSION = "20261201T000000.000Z-abcdef012345"
CUT_LAYERS = 20  # Lite0: the cut before block5c, 19 units above
SHALLOW_LAYERS = 3  # a cut higher up: fewer units above, more below


def _perturbed(weights: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [w + rng.normal(scale=0.01, size=w.shape).astype(w.dtype) for w in weights]


def _registry(root, champion: classifier.Classifier) -> str:
    classifier.save(champion, root / "m" / "versions" / VERSION / "model")
    storage.write_json(str(root / "m" / "champion.json"), {"version": VERSION})
    return str(root)


@pytest.fixture(scope="module")
def published(tmp_path_factory, cache_dir) -> str:
    """A registry whose champion is a Lite0 classifier with a trained-looking (random, seeded) head."""
    champion = classifier.build(SPEC, "imagenet", cache_dir)
    rng = np.random.default_rng(3)
    champion.head.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in champion.head.get_weights()])
    return _registry(tmp_path_factory.mktemp("models"), champion)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, cache_dir) -> str:
    """A registry whose champion was fine-tuned above the CUT_LAYERS cut (top and head changed, bottom ImageNet)."""
    champion = classifier.build(SPEC, "imagenet", cache_dir)
    split = split_backbone(champion.backbone, CUT_LAYERS)
    split.top.set_weights(_perturbed(split.top.get_weights(), 4))
    champion.head.set_weights(_perturbed(champion.head.get_weights(), 5))
    return _registry(tmp_path_factory.mktemp("tuned"), champion)


def test_same_classes_and_backbone_reuse_the_champions_head(published, cache_dir, tmp_path):
    built = classifier.build(SPEC, "imagenet", cache_dir)
    weights, reason = champion_head(built, registry.read_champion(published, "m"), published, "m", tmp_path, cache_dir)
    champion = classifier.load(tmp_path / "champion", cache_dir)
    assert reason == f"warm start from champion {VERSION}'s head"
    assert all(np.array_equal(a, b) for a, b in zip(weights, champion.head.get_weights(), strict=True))


def test_new_classes_or_a_fine_tuned_backbone_fall_back_to_a_fresh_head(published, cache_dir, tmp_path):
    other = classifier.build(dataclasses.replace(SPEC, classes=("a", "b", "d")), "imagenet", cache_dir)
    champion = registry.read_champion(published, "m")
    weights, reason = champion_head(other, champion, published, "m", tmp_path / "1", cache_dir)
    assert weights is None and "new ['d'], removed ['c']" in reason
    random_backbone = classifier.build(SPEC, "none", cache_dir)
    weights, reason = champion_head(random_backbone, champion, published, "m", tmp_path / "2", cache_dir)
    assert weights is None and "fine-tuned" in reason
    weights, reason = champion_head(other, None, str(tmp_path / "empty"), "m", tmp_path / "3", cache_dir)
    assert weights is None and reason.startswith("no champion")


def test_warm_start_loads_the_head_from_the_pointer_read_beside_it_and_a_failed_read_means_a_fresh_head(
        published, cache_dir, tmp_path):
    built = classifier.build(SPEC, "imagenet", cache_dir)
    fresh = weights_digest(built.head.get_weights())
    with ThreadPoolExecutor(1) as pool:
        failed = pool.submit(_raises, StorageError("s3://models/m/champion.json: no S3 credentials"))
        reason = warm_start(built, failed, published, "m", tmp_path / "1", cache_dir)
        assert reason.startswith("the champion of m could not be read (s3://models/m/champion.json: no S3 credentials")
        assert weights_digest(built.head.get_weights()) == fresh
        reason = warm_start(built, pool.submit(registry.read_champion, published, "m"), published, "m",
                            tmp_path / "2", cache_dir)
    champion = classifier.load(tmp_path / "2" / "champion", cache_dir)
    assert reason == f"warm start from champion {VERSION}'s head"
    assert weights_digest(built.head.get_weights()) == weights_digest(champion.head.get_weights()) != fresh


def _raises(error: Exception):
    raise error


def test_fine_tune_starts_from_the_champions_fine_tuned_top_and_head_leaving_the_bottom_alone(fine_tuned, cache_dir,
                                                                                              tmp_path):
    built = classifier.build(SPEC, "imagenet", cache_dir)
    split = split_backbone(built.backbone, CUT_LAYERS)
    bottom, top = weights_digest(split.bottom.get_weights()), weights_digest(split.top.get_weights())
    reason = warm_start_top(built, split, CUT_LAYERS, fine_tuned, "m", tmp_path, cache_dir)
    champion = classifier.load(tmp_path / "champion", cache_dir)
    assert reason == f"warm start from champion {VERSION}'s fine-tuned top (above {split.cut}) and head"
    assert weights_digest(split.bottom.get_weights()) == bottom, "the frozen bottom stays ImageNet's"
    assert weights_digest(split.top.get_weights()) != top
    assert weights_digest(built.backbone.model.get_weights()) == weights_digest(champion.backbone.model.get_weights())
    assert weights_digest(built.head.get_weights()) == weights_digest(champion.head.get_weights())


def test_fine_tune_does_not_warm_start_from_a_top_that_fits_other_activations(fine_tuned, published, cache_dir,
                                                                             tmp_path):
    built = classifier.build(SPEC, "imagenet", cache_dir)
    shallow = split_backbone(built.backbone, SHALLOW_LAYERS)  # the champion changed layers this run keeps frozen
    weights, reason = champion_top(built, shallow, SHALLOW_LAYERS, fine_tuned, "m", tmp_path / "1", cache_dir)
    assert weights is None and "fine-tuned below this run's cut" in reason
    split = split_backbone(built.backbone, CUT_LAYERS)
    weights, reason = champion_top(built, split, CUT_LAYERS, published, "m", tmp_path / "2", cache_dir)
    assert weights is None and reason.endswith(f"champion {VERSION} was not fine-tuned: fine-tune starts from "
                                               "feature extraction's model")
