"""Cached boundary activations: computed once, reused by key, streamed in the image pipeline's epoch order,
and training on them is training on the images."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from tasks import activation_cache, feature_store, images, records
from tasks.activation_cache import Companion, cache_activations, cache_key, open_cache, store_key
from tasks.backbone_split import cut_backbone, split_backbone
from tasks.backbones import load_backbone, make_optimizer, set_trainable_top
from tasks.errors import TrainingError
from tasks.feature_store import FeatureStore, namespace
from tasks.head import build_head, compose
from tests.helpers.runs import examples

SIZE = 32
BATCH = 8
SEED = 5
CLASSES = 3


@pytest.fixture(scope="module")
def train_records(tmp_path_factory) -> Path:
    """48 noisy colour squares of three classes, in class order (an unshuffled epoch would be all one class)."""
    path = tmp_path_factory.mktemp("records") / "train.tfrecord"
    records.write_records(path, examples(16, 0))
    return path


@pytest.fixture(scope="module")
def lite0(cache_dir):
    return load_backbone("efficientnet_lite0", SIZE, cache_dir=cache_dir)


def test_cached_epoch_is_the_image_epoch_through_the_bottom(lite0, train_records, tmp_path):
    split = split_backbone(lite0, 7)
    cached = cache_activations(split.bottom, {"train": train_records}, tmp_path, {"test": 1}, BATCH)["train"]

    assert isinstance(cached.activations, np.memmap), "read from disk, not held in memory"
    assert cached.activations.shape == (48, *split.boundary_shape)
    on_images = records.image_dataset(train_records, SIZE, BATCH, shuffle_seed=SEED)
    batches = list(zip(on_images, cached.batches(BATCH, SEED), strict=False))
    assert len(batches) == 6 == int(cached.batches(BATCH, SEED).cardinality())
    for (image_batch, image_labels), (activations, labels) in batches:
        np.testing.assert_array_equal(labels, image_labels)
        np.testing.assert_allclose(activations, split.bottom(image_batch, training=False), rtol=1e-5, atol=1e-4)
    shuffled = np.concatenate([labels for _, (_, labels) in batches])
    assert list(shuffled) != sorted(shuffled), "the epoch is shuffled"
    in_file_order = np.concatenate([labels for _, labels in cached.batches(BATCH)])
    np.testing.assert_array_equal(in_file_order, np.repeat(np.arange(CLASSES), 16))


def test_epoch_order_matches_the_image_pipeline_beyond_one_shuffle_buffer(tmp_path):
    """More records than the shuffle buffer holds: the order still depends only on the count and the seed."""
    import tensorflow as tf

    count = records.SHUFFLE_BUFFER + 500
    path = tmp_path / "many.tfrecord"
    records.write_canonical(path, ((b"", b"", index, "") for index in range(count)))
    labels = np.arange(count)
    cached = activation_cache.CachedSplit(np.zeros((count, 1), np.float32), labels)

    read = records.epoch_order(tf.data.TFRecordDataset(str(path)), SEED).map(
        lambda serialized: tf.io.parse_single_example(
            serialized, {"label": tf.io.FixedLenFeature([], tf.int64)})["label"])
    from_cache = np.concatenate([batch_labels for _, batch_labels in cached.batches(1000, SEED)])
    np.testing.assert_array_equal(from_cache, np.fromiter(read.as_numpy_iterator(), np.int64))
    assert not np.array_equal(from_cache, labels)


def test_matching_key_reuses_the_cache_and_another_key_recomputes(lite0, train_records, tmp_path, monkeypatch):
    split = split_backbone(lite0, 1)
    key = cache_key(lite0, split, data_hash="abc")
    digest = feature_store.weights_digest(split.bottom.get_weights())
    assert key == {"backbone": "efficientnet_lite0", "weights": digest, "image_size": SIZE, "cut": "head", "units": 1,
                   "data": "abc", "decoder": images.DECODER_VERSION}
    first = cache_activations(split.bottom, {"train": train_records}, tmp_path, key, BATCH)["train"]
    passes = []
    write = activation_cache._write_split
    monkeypatch.setattr(activation_cache, "_write_split",
                        lambda *args, **kwargs: passes.append(args[-1]) or write(*args, **kwargs))

    again = cache_activations(split.bottom, {"train": train_records}, tmp_path, key, BATCH)["train"]
    assert passes == []
    np.testing.assert_array_equal(again.activations, first.activations)
    assert open_cache(tmp_path, {**key, "data": "other"}, ["train"]) is None
    cache_activations(split.bottom, {"train": train_records}, tmp_path, {**key, "data": "other"}, BATCH)
    assert passes == ["train"]
    assert open_cache(tmp_path, key, ["train"]) is None, "the old key's cache is gone"


def test_a_backbone_rebuilt_with_the_same_weights_has_the_same_key(lite0, cache_dir):
    """Fine-tuning rebuilds the backbone without weights and loads the ones feature extraction saved: its key must be
    the one feature extraction cached the boundary activations under, and other weights another key."""
    rebuilt = load_backbone("efficientnet_lite0", SIZE, "none", cache_dir=cache_dir)
    random_key = cache_key(rebuilt, cut_backbone(rebuilt, 19), "abc")
    rebuilt.model.set_weights(lite0.model.get_weights())

    assert rebuilt.weights_source != lite0.weights_source
    assert cache_key(rebuilt, cut_backbone(rebuilt, 19), "abc") == cache_key(lite0, cut_backbone(lite0, 19), "abc")
    assert random_key != cache_key(lite0, cut_backbone(lite0, 19), "abc")


def test_a_companion_output_is_cached_beside_only_when_every_image_went_through(lite0, train_records, tmp_path):
    """Feature extraction's pass leaves fine-tuning's boundary activations: the second output of one pass, in its own
    cache and store namespace; a pass that took images from the store has none to leave."""
    whole, split = split_backbone(lite0, 0), cut_backbone(lite0, 19)
    pixels = keras.Input((SIZE, SIZE, 3))
    boundary = split.bottom(pixels)
    both = keras.Model(pixels, [split.top(boundary), boundary])
    store = FeatureStore(str(tmp_path / "store"))
    features_key, boundary_key = {"output": "features", "data": "1"}, {"output": "boundary", "data": "1"}

    features = cache_activations(both, {"train": train_records}, tmp_path / "features", features_key, BATCH, store,
                                 companion=Companion(tmp_path / "boundary", boundary_key))["train"]
    left = open_cache(tmp_path / "boundary", boundary_key, ["train"])["train"]

    images_, labels = zip(*records.image_dataset(train_records, SIZE, BATCH), strict=True)
    pixels_in_order = np.concatenate(images_)
    np.testing.assert_allclose(features.activations, whole.bottom.predict(pixels_in_order, verbose=0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(left.activations, split.bottom.predict(pixels_in_order, verbose=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(left.labels, np.concatenate(labels))
    stored = {key["output"]: len(store.present(namespace(store_key(key)))) for key in (features_key, boundary_key)}
    assert stored == {"features": 48, "boundary": 48}

    again = Companion(tmp_path / "boundary-again", {**boundary_key, "data": "2"})
    cache_activations(both, {"train": train_records}, tmp_path / "features-again", {**features_key, "data": "2"},
                      BATCH, store, companion=again)
    assert not again.directory.exists(), "every image came from the store: no boundary activations to leave"


def test_split_without_images_is_a_clear_error(lite0, tmp_path):
    empty = tmp_path / "val.tfrecord"
    records.write_records(empty, [])
    split = split_backbone(lite0, 1)
    with pytest.raises(TrainingError, match="val.tfrecord: no images in the val split; rerun subsample"):
        cache_activations(split.bottom, {"val": empty}, tmp_path / "cache", {"k": 1}, BATCH)
    assert open_cache(tmp_path / "cache", {"k": 1}, ["val"]) is None


def _one_epoch(model: keras.Model, backbone, batches) -> list[np.ndarray]:
    model.compile(optimizer=make_optimizer("adam", 1e-3, backbone), loss="sparse_categorical_crossentropy")
    model.fit(batches, epochs=1, steps_per_epoch=6, shuffle=False, verbose=0)
    return [variable.numpy() for variable in model.trainable_variables]


@pytest.mark.parametrize("units", [0, 19])
def test_one_epoch_on_cached_activations_trains_the_same_weights_as_on_images(units, cache_dir, train_records,
                                                                              tmp_path):
    """Same start, seed and order: top + head on the cache end where bottom + top + head on images end.

    units=0 is feature extraction (head on cached features), 19 the default fine-tuning cut.
    """
    cached_backbone = load_backbone("efficientnet_lite0", SIZE, cache_dir=cache_dir)
    split = split_backbone(cached_backbone, units)
    cached = cache_activations(split.bottom, {"train": train_records}, tmp_path, {"units": units}, BATCH)["train"]
    keras.utils.set_random_seed(1)  # the same initial head and dropout seed for both
    head = build_head(split.top.output_shape[1:], CLASSES, dropout=0.2)
    initial = head.weights[0].numpy().copy()
    boundary = keras.Input(split.boundary_shape)
    on_cache = _one_epoch(keras.Model(boundary, head(split.top(boundary, training=False))), cached_backbone,
                          cached.batches(BATCH, SEED))

    image_backbone = load_backbone("efficientnet_lite0", SIZE, cache_dir=cache_dir)
    set_trainable_top(image_backbone, split.units)
    keras.utils.set_random_seed(1)
    on_images = _one_epoch(compose(image_backbone, build_head(split.top.output_shape[1:], CLASSES, dropout=0.2)),
                           image_backbone, records.image_dataset(train_records, SIZE, BATCH, shuffle_seed=SEED))

    assert len(on_cache) == len(on_images) == units + 2  # a kernel per unit, the head's kernel and bias
    assert not np.allclose(on_cache[-2], initial), "the epoch changed the head"
    # the same training up to float32 reassociation: the bottom runs in its own graph on one path and inline on the
    # other, and an epoch of Adam carries those ~1e-8 differences into a few weights at up to ~1e-6 (updates are
    # ~1e-3; a different order or image would be off by far more)
    for trained_on_cache, trained_on_images in zip(on_cache, on_images, strict=True):
        np.testing.assert_allclose(trained_on_cache, trained_on_images, rtol=1e-5, atol=1e-5)
