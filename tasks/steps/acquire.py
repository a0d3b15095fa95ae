"""Acquire: fetch the run's dataset source into this worker's cache and index it for subsample.

What a source may be, and how each is fetched, checked and cached, is tasks.datasets.
"""
from __future__ import annotations

import logging
from typing import Any

from tasks import artifacts, storage
from tasks.config import RunConfig
from tasks.datasets import entry_record, local_dataset, scan, snapshot
from tasks.redact import redact_uri

log = logging.getLogger(__name__)


def acquire(cfg: RunConfig) -> dict[str, Any]:
    """Fetch the source into this worker's cache and write its index (`data/acquired.json`) for subsample.

    The index holds where the images are, the classes in label order and every
    file per split and class, so subsample selects from it without scanning or
    fetching the source again.
    """
    root = local_dataset(cfg.source, cfg.cache_dir, cfg.source_sha256)
    folder = scan(root)
    source = redact_uri(cfg.source)
    index = {
        "source": source,
        "root": str(root),
        "classes": list(folder.classes),
        "files": {split: [list(paths) for paths in per_class] for split, per_class in folder.files.items()},
        "counts": folder.counts(),
        "skipped": list(folder.skipped),
        "sha256": entry_record(root).get("sha256", ""),
        "snapshot": snapshot(root),
    }
    uri = cfg.artifact(artifacts.ACQUIRED)
    storage.write_json(uri, index)
    totals = {split: sum(per_class.values()) for split, per_class in index["counts"].items()}
    log.info("acquired %s at %s: %d classes, %s -> %s", source, root, len(folder.classes),
             " ".join(f"{split}={n}" for split, n in totals.items()), uri)
    return {"source": source, "n_classes": len(folder.classes), "counts": totals, "uri": uri}
