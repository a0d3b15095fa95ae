"""Acquire: fetch the run's dataset source into this worker's cache and index it for subsample.

What a source may be, and how each is fetched, checked and cached, is tasks.datasets.
A `test_source`, when given, is fetched and indexed beside it (tasks.test_source).
"""
from __future__ import annotations

import logging
from typing import Any

from tasks import artifacts, storage, test_source
from tasks.config import RunConfig
from tasks.datasets import source_index

log = logging.getLogger(__name__)


def acquire(cfg: RunConfig) -> dict[str, Any]:
    """Fetch the source into this worker's cache and write its index (`data/acquired.json`) for subsample.

    The index holds where the images are, the classes in label order and every
    file per split and class, so subsample selects from it without scanning or
    fetching the source again; with a `test_source`, the same for it under
    `test_source` (its test split replaces the source's).
    """
    index = source_index(cfg.source, cfg.cache_dir, cfg.source_sha256)
    if cfg.test_source:
        index["test_source"] = test_source.index_test_source(cfg.test_source, cfg.cache_dir)
    uri = cfg.artifact(artifacts.ACQUIRED)
    storage.write_json(uri, index)
    totals = {split: sum(per_class.values()) for split, per_class in index["counts"].items()}
    log.info("acquired %s at %s: %d classes, %s -> %s", index["source"], index["root"], len(index["classes"]),
             " ".join(f"{split}={n}" for split, n in totals.items()), uri)
    result = {"source": index["source"], "n_classes": len(index["classes"]), "counts": totals, "uri": uri}
    if cfg.test_source:
        result["test_source"] = index["test_source"]["source"]
        result["test_counts"] = sum(index["test_source"]["counts"]["test"].values())
    return result
