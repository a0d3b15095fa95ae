"""Has the training data changed? The fingerprint of an S3 prefix's (or folder's) listing, for the retrain watcher.

A listing names every object below the prefix with its size and version (the
S3 ETag, a local file's modification time): any upload, overwrite or delete
changes its fingerprint, and reading it costs one paginated LIST, no object
reads. The Airflow trigger that polls it lives in plugins/ (it imports
Airflow); these are its plain parts.
"""
from __future__ import annotations

import hashlib
import os
from typing import Mapping

from tasks import storage


def listing(prefix: str, env: Mapping[str, str] | None = None) -> list[tuple[str, int, str]]:
    """(key below the prefix, size, version) of every object/file, sorted; `env` holds the store's AWS_* settings."""
    base = prefix.rstrip("/") + "/"
    if not storage.is_s3(prefix) or env is None:
        return [(item.uri[len(base):], item.size, item.version) for item in storage.list_stored(base)]
    bucket, key = storage.split_s3(base)
    found = []
    client = storage.s3_client({**os.environ, **env})
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        found.extend((obj["Key"][len(key):], int(obj.get("Size", 0)), obj.get("ETag", ""))
                     for obj in page.get("Contents", []))
    return sorted(found)


def listing_fingerprint(prefix: str, env: Mapping[str, str] | None = None) -> str:
    """One sha256 over the listing: equal fingerprints, equal data (as far as the store's versions tell)."""
    digest = hashlib.sha256()
    for key, size, version in listing(prefix, env):
        digest.update(f"{key}\t{size}\t{version}\n".encode())
    return digest.hexdigest()
