"""Warm start: the champion's head is reused when it fits the run's classes and frozen backbone, never otherwise."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tasks import classifier, storage
from tasks.classifier import ClassifierSpec
from tasks.warm_start import champion_head

pytestmark = pytest.mark.slow

SPEC = ClassifierSpec("efficientnet_lite0", 32, ("a", "b", "c"), 0.2)


@pytest.fixture(scope="module")
def published(tmp_path_factory, cache_dir) -> str:
    """A registry whose champion is a Lite0 classifier with a trained-looking (random, seeded) head."""
    root = tmp_path_factory.mktemp("models")
    champion = classifier.build(SPEC, "imagenet", cache_dir)
    rng = np.random.default_rng(3)
    champion.head.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in champion.head.get_weights()])
    classifier.save(champion, root / "m" / "versions" / "v1" / "model")
    storage.write_json(str(root / "m" / "champion.json"), {"version": "v1"})
    return str(root)


def test_same_classes_and_backbone_reuse_the_champions_head(published, cache_dir, tmp_path):
    built = classifier.build(SPEC, "imagenet", cache_dir)
    weights, reason = champion_head(built, published, "m", tmp_path, cache_dir)
    champion = classifier.load(tmp_path / "champion", cache_dir)
    assert reason == "warm start from champion v1's head"
    assert all(np.array_equal(a, b) for a, b in zip(weights, champion.head.get_weights(), strict=True))


def test_new_classes_or_a_fine_tuned_backbone_fall_back_to_a_fresh_head(published, cache_dir, tmp_path):
    other = classifier.build(dataclasses.replace(SPEC, classes=("a", "b", "d")), "imagenet", cache_dir)
    weights, reason = champion_head(other, published, "m", tmp_path / "1", cache_dir)
    assert weights is None and "new ['d'], removed ['c']" in reason
    random_backbone = classifier.build(SPEC, "none", cache_dir)
    weights, reason = champion_head(random_backbone, published, "m", tmp_path / "2", cache_dir)
    assert weights is None and "fine-tuned" in reason
    weights, reason = champion_head(other, str(tmp_path / "empty"), "m", tmp_path / "3", cache_dir)
    assert weights is None and reason.startswith("no champion")
