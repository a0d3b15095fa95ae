"""Mixup on cached features (the `mixup` param): blends features and labels alike, seeded, and trains."""
from __future__ import annotations

import numpy as np
import pytest

from tasks import phases
from tests.helpers.runs import candidate, subsampled, tiny_run

CLASSES = 4


def batches(seed_rows: int = 8):
    """Batches whose features are 10 x their one-hot label: a blend keeps features == 10 x blended labels."""
    import tensorflow as tf

    labels = np.arange(seed_rows) % CLASSES
    onehot = np.eye(CLASSES, dtype=np.float32)[labels]
    return tf.data.Dataset.from_tensor_slices((10 * onehot, onehot)).batch(4)


def mixed(alpha: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each batch mixed as the head's loop mixes batch `index` of the epoch whose seed is `seed`."""
    import tensorflow as tf

    from tasks.head_training import mix

    return [tuple(part.numpy() for part in mix(x, y, alpha, tf.constant([seed, index], tf.int64)))
            for index, (x, y) in enumerate(batches())]


def test_mixup_blends_features_and_labels_with_the_same_weights():
    plain = [(x.numpy(), y.numpy()) for x, y in batches()]
    blended = mixed(0.4, seed=3)
    assert len(blended) == len(plain)
    for x, y in blended:
        np.testing.assert_allclose(x, 10 * y, rtol=1e-5, atol=1e-5)  # the features blend as the labels do
        np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-5)
        assert (y >= 0).all()
    assert not all(np.allclose(y, y_plain) for (_, y), (_, y_plain) in zip(blended, plain, strict=True))


def test_mixup_is_seeded_per_epoch():
    first, again, other = mixed(0.4, seed=5), mixed(0.4, seed=5), mixed(0.4, seed=6)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))  # a resumed epoch repeats
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


@pytest.mark.slow
def test_feature_extraction_trains_with_mixup_and_records_it(tmp_path, cache_dir):
    from tasks.steps.train import train

    cfg = tiny_run(str(tmp_path), cache_dir, epochs=3, patience=10, mixup=0.4)
    result = train(cfg, subsampled(cfg), candidate(cfg))
    summary = phases.read_summary(result["summary_uri"])
    assert summary.settings["mixup"] == 0.4 and result["epochs_run"] == 3
    assert 0 <= result["val_accuracy"] <= 1
