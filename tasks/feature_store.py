"""A content-addressed store of per-image backbone outputs, shared by runs: a retrain computes only new images.

What a frozen backbone (or the part below a fine-tuning cut) makes of an image
depends only on the backbone spec and its weights, the image size, the decoder
and the cut, and on the image's bytes. So entries live under a namespace (a
digest of those, with a readable `key.json` beside them) and are named by the
image's sha256 (the hash subsample records in the manifest):
`<root>/<namespace>/<sha[:2]>/<sha>.npy`.

- Atomic writes: an entry is one object (write-then-rename locally, one PUT on
  S3), so a reader sees a whole entry or none; writers racing on one image write
  the same bytes.
- Verified reads: an entry starts with the sha256 of its payload; an entry that
  does not match (a torn copy, a disk error, a hand edit) is a miss, deleted and
  recomputed. Payloads are .npy without pickles.
- Bounded: `evict` removes least-recently-used entries until the store fits its
  size cap. Locally a hit refreshes the entry's modification time; on S3 the
  order is the last write (S3 cannot touch an object without rewriting it).

The root is a deployment setting (TLP_FEATURE_STORE, TLP_FEATURE_STORE_MAX_BYTES).
No TensorFlow here: `extract` takes the traced backbone as a function.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tasks import storage
from tasks.errors import StorageError

log = logging.getLogger(__name__)

MAGIC = b"TLFS1\n"
DIGEST_BYTES = 32
KEY_FILE = "key.json"
SUFFIX = ".npy"
S3_IO_THREADS = 8  # concurrent entry reads/writes on S3: a round trip per entry, so latency, not CPU, bounds them
# A local store is read and written by one thread: its entries are page-cache reads and small file creations, and
# more threads only contend (6,000 entries on the 2-core VM: written in 0.7 s by one thread, 1.1 s by two, 1.45 s
# by eight; read in 1.2 s by one, 1.8 s by eight), taking CPU from the backbone that reads run beside.
LOCAL_IO_THREADS = 1
IN_FLIGHT = 256  # entries read ahead of the caller, at most (memory: IN_FLIGHT entries)
WRITE_CHUNK = 32  # entries per write task: one task per image costs a thread hand-off per image


def namespace(key: dict[str, Any]) -> str:
    """The folder of everything computed under `key` (backbone, weights digest, image size, decoder, cut)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def weights_digest(arrays: Iterable[np.ndarray]) -> str:
    """sha256 over a model's weight arrays (shapes, dtypes and values): two backbones with equal digests compute
    the same features."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def encode(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes) -> np.ndarray | None:
    """The stored array, or None when the bytes are not a whole, unaltered entry."""
    head = len(MAGIC) + DIGEST_BYTES
    if len(data) < head or not data.startswith(MAGIC):
        return None
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        return None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except ValueError:
        return None


@dataclass(frozen=True)
class FeatureStore:
    """A store root (local folder or s3:// prefix) with a size cap in bytes (0 = no cap)."""

    root: str
    max_bytes: int = 0

    @property
    def io_threads(self) -> int:
        return S3_IO_THREADS if storage.is_s3(self.root) else LOCAL_IO_THREADS

    def entry(self, space: str, sha256: str) -> str:
        return storage.join(self.root, space, sha256[:2], sha256 + SUFFIX)

    def describe(self, space: str, key: dict[str, Any]) -> None:
        """Write the namespace's readable key once (what its entries were computed with)."""
        uri = storage.join(self.root, space, KEY_FILE)
        if not storage.exists(uri):
            storage.write_json(uri, key)

    def present(self, space: str) -> set[str]:
        """The image hashes the namespace holds (one listing; entries are verified when read)."""
        prefix = storage.join(self.root, space) + "/"
        try:
            if not storage.is_s3(prefix):  # names only: a stat per entry would cost more than the backbone saves
                return {entry.name[:-len(SUFFIX)] for entry in storage.local_files(storage.local_path(prefix))
                        if entry.name.endswith(SUFFIX)}
            stored = storage.list_stored(prefix)
        except (StorageError, FileNotFoundError, NotADirectoryError):
            return set()
        return {item.uri.rsplit("/", 1)[-1][:-len(SUFFIX)] for item in stored if item.uri.endswith(SUFFIX)}

    def get(self, space: str, sha256: str) -> np.ndarray | None:
        """The entry's array, or None when absent or not verified (a bad entry is deleted)."""
        uri = self.entry(space, sha256)
        try:
            data = storage.read_bytes(uri)
        except StorageError:
            return None
        array = decode(data)
        if array is None:
            log.warning("feature store: %s failed verification; deleting it, it will be recomputed", uri)
            storage.delete(uri)
            return None
        if not storage.is_s3(uri):
            _touch(storage.local_path(uri))
        return array

    def put(self, space: str, sha256: str, array: np.ndarray) -> None:
        storage.write_bytes(self.entry(space, sha256), encode(array))

    def put_many(self, space: str, entries: list[tuple[str, np.ndarray]]) -> int:
        for sha256, array in entries:
            self.put(space, sha256, array)
        return len(entries)

    def evict(self) -> int:
        """Delete least-recently-used entries until the store fits its cap; returns how many were deleted."""
        if not self.max_bytes:
            return 0
        entries = [item for item in _entries_by_age(self.root) if item[0].endswith(SUFFIX)]
        total = sum(size for _, size, _ in entries)
        deleted = 0
        for uri, size, _ in entries:
            if total <= self.max_bytes:
                break
            storage.delete(uri)
            total -= size
            deleted += 1
        if deleted:
            log.info("feature store: evicted %d least-recently-used entries from %s (now %.1f MB, cap %.1f MB)",
                     deleted, self.root, total / 1e6, self.max_bytes / 1e6)
        return deleted


@dataclass(frozen=True)
class Extracted:
    """One split's per-image outputs in file order, and which of them went through the backbone: `computed`, the
    indices of those images, is complete once `features` has been consumed (an entry lost since the listing is
    computed on its own and added then)."""

    features: Iterator[np.ndarray]
    computed: list[int]


def extract(store: FeatureStore, space: str, hashes: list[str], compute: Callable[[list[int]], Iterator[np.ndarray]]
            ) -> Extracted:
    """Each image's output in order, from the store where it has the image, else from `compute`.

    `hashes` are the images' sha256 in file order; `compute(indices)` yields the
    outputs of those images (in that order). Nothing is written here: the caller
    adds the computed outputs with `fill` once it has them whole, after the pass,
    so that writing thousands of entries does not take CPU from the backbone.
    Reads run beside the caller (on S3 on a few threads, at most IN_FLIGHT ahead
    of it), so storage latency (an S3 round trip per image) overlaps the backbone.
    """
    present = store.present(space)
    missing = [index for index, sha in enumerate(hashes) if sha not in present]
    computed = list(missing)

    def ordered() -> Iterator[np.ndarray]:
        from_backbone = compute(missing)
        pending = set(missing)
        with ThreadPoolExecutor(store.io_threads, thread_name_prefix="feature-store") as pool:
            reads = _ahead(pool, (lambda sha=hashes[index]: store.get(space, sha)
                                  for index in range(len(hashes)) if index not in pending))
            for index in range(len(hashes)):
                if index in pending:
                    yield next(from_backbone)
                    continue
                array = next(reads)
                if array is None:  # lost since the listing
                    array = next(compute([index]))
                    computed.append(index)
                yield array

    return Extracted(ordered(), computed)


def fill(store: FeatureStore, space: str, entries: list[tuple[str, np.ndarray]]) -> int:
    """Add (image sha256, output) entries to the namespace, then evict down to the cap; returns how many were written.

    The store is a cache: a write that fails (a full disk, a lost connection) is
    logged, not raised; the run has its outputs already and the next run
    computes what is missing.
    """
    chunks = [entries[start:start + WRITE_CHUNK] for start in range(0, len(entries), WRITE_CHUNK)]
    written = 0
    try:
        with ThreadPoolExecutor(store.io_threads, thread_name_prefix="feature-store") as pool:
            for count in pool.map(functools.partial(store.put_many, space), chunks):
                written += count
        store.evict()
    except (StorageError, OSError) as error:
        log.warning("feature store: stored %d of %d new entries under %s, then failed (%s); the next run "
                    "computes the rest again", written, len(entries), store.root, error)
    return written


def _ahead(pool: ThreadPoolExecutor, calls: Iterable[Callable[[], Any]]) -> Iterator[Any]:
    """The calls' results in order, computed on `pool` at most IN_FLIGHT ahead of the consumer."""
    window: collections.deque[Future] = collections.deque()
    for call in calls:
        window.append(pool.submit(call))
        if len(window) > IN_FLIGHT:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _touch(path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        pass  # evicted by another process since the read: the array in hand is still whole


def _entries_by_age(root: str) -> list[tuple[str, int, float]]:
    """(uri, size, last use) of every object below the root, least recently used first."""
    if not storage.is_s3(root):
        found = []
        try:
            for entry in storage.local_files(storage.local_path(root)):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((entry.path, stat.st_size, stat.st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            pass  # no store yet
        return sorted(found, key=lambda item: item[2])
    bucket, key = storage.split_s3(root.rstrip("/") + "/")
    found = []
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        found.extend((f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj["LastModified"].timestamp())
                     for obj in page.get("Contents", []))
    return sorted(found, key=lambda item: item[2])
