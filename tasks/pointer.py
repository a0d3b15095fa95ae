"""A small JSON object that several writers may move at once: tagged reads and conditional writes.

The champion pointer is read, judged and rewritten by publishes that can run at
the same time. A plain PUT would let the slower one overwrite a better choice
it never saw, so every write is conditional on the object being exactly the
one that was read: S3 `If-Match: <ETag>` (or `If-None-Match: *` when there
was none), answered 412 when another writer came first; locally the same
check under an exclusive lock. AWS S3 (since 2024), MinIO and SeaweedFS 4.48
honour both headers; a store that silently ignores them would turn every
write back into a blind one, so `require_conditional_writes` probes the store
first and refuses to go on with one that does.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from tasks import storage
from tasks.errors import PublishError

PROBE = ".conditional-write-probe"


def read(uri: str) -> tuple[Any, str | None]:
    """(value, tag) of a JSON object, or (None, None) when it does not exist (nor its bucket: a registry nothing has
    been published to yet); the tag names this exact content."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not path.is_file():
            return None, None
        data = path.read_bytes()
        return json.loads(data), hashlib.sha256(data).hexdigest()
    bucket, key = storage.split_s3(uri)
    response = _s3(uri, functools.partial(storage.s3_client().get_object, Bucket=bucket, Key=key),
                   refused=("NoSuchKey", "NoSuchBucket", "404", "NotFound"))
    return (None, None) if response is None else (json.loads(response["Body"].read()), response["ETag"])


def write_if(uri: str, value: Any, tag: str | None) -> bool:
    """Write a JSON object only if it is still the one read with `tag` (None: only if it does not exist).

    True when written; False when another writer changed it since: read again and
    decide again.
    """
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    if not storage.is_s3(uri):
        with _locked(uri):
            if read(uri)[1] != tag:
                return False
            storage.write_bytes(uri, data)
            return True
    bucket, key = storage.split_s3(uri)
    condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
    put = functools.partial(storage.s3_client().put_object, Bucket=bucket, Key=key, Body=data, **condition)
    return _s3(uri, put, refused=("PreconditionFailed", "412")) is not None


def require_conditional_writes(base_uri: str) -> None:
    """PublishError when the store behind `base_uri` ignores If-Match / If-None-Match (checked once per process)."""
    if storage.is_s3(base_uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        _check_store(endpoint, storage.join(base_uri, PROBE))


@functools.lru_cache(maxsize=32)
def _check_store(endpoint: str, probe_uri: str) -> None:
    """Write the probe, then two writes that must be refused: one expecting absence, one a wrong tag."""
    storage.write_json(probe_uri, {"purpose": "checks that this store honours conditional writes"})
    if write_if(probe_uri, {"purpose": "must be refused"}, None) or \
            write_if(probe_uri, {"purpose": "must be refused"}, '"00000000000000000000000000000000"'):
        raise PublishError(f"the object store {endpoint or 'AWS S3'} ignores conditional writes (If-None-Match / "
                           f"If-Match on PUT, probed at {probe_uri}), so two publishes could move the champion to "
                           "the worse model; publish to a store that honours them (AWS S3, MinIO, SeaweedFS) or "
                           "move the champion by hand with `python -m tasks.registry rollback`")


@contextmanager
def _locked(uri: str) -> Iterator[None]:
    """An exclusive lock beside a local file, held while it is compared and replaced."""
    path = storage.local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _s3(uri: str, call: Callable[[], dict], refused: tuple[str, ...]) -> dict | None:
    """The response of one S3 call; None when the store refuses it with one of the `refused` codes."""
    from botocore.exceptions import ClientError

    try:
        return call()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in refused:
            return None
        raise storage._s3_error(uri, error) from error
    except Exception as error:
        raise storage._s3_error(uri, error) from error
