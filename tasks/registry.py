"""TEMPORARY stand-in (engineer `trust-publish` moves the registry here from tasks/steps/publish.py): the names
batch scoring reads, without importing publish (which imports Keras). At merge take main's version."""
from __future__ import annotations

from tasks import pointer, storage

CHECKSUMS = "checksums.json"


def read_champion(publish_uri: str, model_name: str) -> dict | None:
    """The current champion pointer, or None before the first promotion."""
    return pointer.read(storage.join(publish_uri, model_name, "champion.json"))[0]
