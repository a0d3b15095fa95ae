"""Batch step 1: fix the model version, list the images to score and cut them into shards, one mapped
`score_shard` task each.

The listing (the model version every shard scores with, paths relative to the
source, and each shard's range) is written to the run root, where every shard
task reads it: the DAG edge carries only shard numbers, so no path travels
through XCom. Files that are not images by their name are listed in the
summary, not scored.
"""
from __future__ import annotations

import logging

from tasks import artifacts, batch_scoring, scoring_model, storage
from tasks.batch_config import MAX_SHARDS, BatchConfig
from tasks.errors import ConfigError, DatasetError
from tasks.redact import redact_uri

log = logging.getLogger(__name__)


def list_images(cfg: BatchConfig) -> list[dict]:
    """Write the listing to the run root; returns one {"index", "n_images"} per shard.

    The model version is the one `cfg` names, or the champion's now: the listing fixes it for every shard."""
    version = scoring_model.resolve_version(cfg.registry, cfg.model_name, cfg.model_version)
    root = batch_scoring.images_root(cfg.images, cfg.cache_dir)
    found, others = batch_scoring.list_images(root)
    shown = redact_uri(cfg.images)
    if not found:
        raise DatasetError(f"no images under {shown} (looked for {', '.join(batch_scoring.IMAGE_SUFFIXES)}; "
                           f"found {len(others)} other files); give a folder, prefix or archive of images")
    bounds = batch_scoring.shard_bounds(len(found), cfg.shard_size)
    if len(bounds) > MAX_SHARDS:
        raise ConfigError(f"shard_size={cfg.shard_size} cuts {len(found):,} images into {len(bounds)} shards, more "
                          f"than the {MAX_SHARDS} mapped tasks Airflow allows; use shard_size >= "
                          f"{-(-len(found) // MAX_SHARDS)}")
    uri = cfg.artifact(artifacts.BATCH_LISTING)
    storage.write_json(uri, {"images": shown, "model_version": version, "paths": found,
                             "other_files": others, "shards": bounds})
    log.info("list_images: %d images (%d other files) under %s in %d shards of up to %d for %s %s -> %s", len(found),
             len(others), shown, len(bounds), cfg.shard_size, cfg.model_name, version, uri)
    return [{"index": index, "n_images": end - start} for index, (start, end) in enumerate(bounds)]
