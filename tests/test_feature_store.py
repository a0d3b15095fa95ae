"""The shared feature store: content-addressed, atomic, verified, bounded, safe under concurrent writers."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time

import numpy as np
import pytest

from tasks import feature_store
from tasks.feature_store import FeatureStore


def _sha(n: int) -> str:
    return hashlib.sha256(f"image-{n}".encode()).hexdigest()


def _features(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(8,)).astype(np.float32)


@pytest.mark.fast
def test_namespace_changes_with_every_part_of_the_key():
    key = {"backbone": "efficientnet_lite0", "weights": "abc", "image_size": 96, "decoder": "1", "cut": 0}
    spaces = {feature_store.namespace({**key, name: "other"}) for name in key}
    assert len(spaces | {feature_store.namespace(key)}) == len(key) + 1


@pytest.mark.fast
def test_weights_digest_sees_a_changed_weight():
    weights = [np.ones((3, 3), np.float32), np.zeros(4, np.float32)]
    changed = [weights[0].copy(), weights[1].copy()]
    changed[1][2] = 1e-7
    assert feature_store.weights_digest(weights) != feature_store.weights_digest(changed)
    assert feature_store.weights_digest(weights) == feature_store.weights_digest([w.copy() for w in weights])


@pytest.mark.fast
def test_extract_computes_only_what_the_store_lacks(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    calls = []

    def compute(indices):
        calls.append(list(indices))
        return iter([_features(i) for i in indices])

    hashes = [_sha(i) for i in range(10)]
    first = feature_store.extract(store, "ns", hashes, compute)
    features = list(first.features)
    assert first.computed == list(range(10)) and store.present("ns") == set()  # extract itself writes nothing
    assert feature_store.fill(store, "ns", [(hashes[i], features[i]) for i in first.computed]) == 10
    grown = hashes + [_sha(10), _sha(11)]
    second = feature_store.extract(store, "ns", grown, compute)
    got = list(second.features)
    assert second.computed == [10, 11] and calls[-1] == [10, 11]
    assert all(np.array_equal(got[i], _features(i)) for i in range(12))


@pytest.mark.fast
def test_a_corrupt_entry_is_a_miss_and_is_recomputed(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.put("ns", _sha(1), _features(1))
    path = tmp_path / "store" / "ns" / _sha(1)[:2] / f"{_sha(1)}.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get("ns", _sha(1)) is None
    assert not path.exists()
    extracted = feature_store.extract(store, "ns", [_sha(1)], lambda idx: iter([_features(1)] * len(idx)))
    assert np.array_equal(list(extracted.features)[0], _features(1)) and extracted.computed == [0]


@pytest.mark.fast
def test_an_entry_lost_after_the_listing_is_computed_and_counted(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.put("ns", _sha(1), _features(1))
    store.put("ns", _sha(2), _features(2))
    extracted = feature_store.extract(store, "ns", [_sha(1), _sha(2)], lambda idx: iter([_features(2)] * len(idx)))
    os.unlink(store.entry("ns", _sha(2)))  # evicted by another run between the listing and the read
    got = list(extracted.features)
    assert np.array_equal(got[0], _features(1)) and np.array_equal(got[1], _features(2))
    assert extracted.computed == [1]


@pytest.mark.fast
def test_a_failing_fill_is_logged_and_keeps_what_it_wrote(tmp_path, caplog):
    root = tmp_path / "store"
    store = FeatureStore(str(root))
    store.put("ns", _sha(0), _features(0))
    (root / "ns" / _sha(50)[:2]).write_bytes(b"")  # a file where entry 50's folder goes: its write fails
    written = feature_store.fill(store, "ns", [(_sha(n), _features(n)) for n in range(1, 100)])
    assert written < 99 and "the next run computes the rest again" in caplog.text
    assert np.array_equal(store.get("ns", _sha(0)), _features(0)) and store.get("ns", _sha(1)) is not None


@pytest.mark.fast
def test_truncated_entry_fails_verification():
    data = feature_store.encode(_features(3))
    assert np.array_equal(feature_store.decode(data), _features(3))
    assert feature_store.decode(data[:-5]) is None
    assert feature_store.decode(b"not an entry") is None


@pytest.mark.fast
def test_eviction_drops_least_recently_used_first(tmp_path):
    entry_bytes = len(feature_store.encode(_features(0)))
    store = FeatureStore(str(tmp_path / "store"), max_bytes=3 * entry_bytes)
    for n in range(4):
        store.put("ns", _sha(n), _features(n))
        os.utime(store.entry("ns", _sha(n)), (1000 + n, 1000 + n))
    assert store.get("ns", _sha(0)) is not None  # a hit makes 0 the most recently used
    assert store.evict() == 1
    assert store.present("ns") == {_sha(0), _sha(2), _sha(3)}


def _writer(root: str, seed: int, rounds: int) -> None:
    store = FeatureStore(root, max_bytes=0)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        n = int(rng.integers(0, 20))
        store.put("ns", _sha(n), _features(n))
        got = store.get("ns", _sha(int(rng.integers(0, 20))))
        if got is not None and not any(np.array_equal(got, _features(k)) for k in range(20)):
            raise AssertionError("read a torn or foreign entry")


@pytest.mark.fast
def test_concurrent_writers_never_corrupt_the_store(tmp_path):
    root = str(tmp_path / "store")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(root, seed, 150)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    store = FeatureStore(root)
    for sha in store.present("ns"):
        n = next(k for k in range(20) if _sha(k) == sha)
        assert np.array_equal(store.get("ns", sha), _features(n))
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name.startswith(".")]


@pytest.mark.slow
def test_store_on_s3_round_trips_and_evicts(s3_bucket):
    entry_bytes = len(feature_store.encode(_features(0)))
    store = FeatureStore(f"{s3_bucket}/features", max_bytes=2 * entry_bytes)
    for n in range(3):
        store.put("ns", _sha(n), _features(n))
        time.sleep(1.1)  # S3 LastModified has one-second resolution
    assert np.array_equal(store.get("ns", _sha(2)), _features(2))
    assert store.evict() == 1
    assert store.present("ns") == {_sha(1), _sha(2)}
