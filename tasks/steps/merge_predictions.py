"""Batch step 3: merge the shards' predictions, summarise the batch, and build the UI's gallery.

Which shards belong to the run comes from the run root (the listing and one
record per shard), never from what the mapped tasks returned. The merged
Parquet and CSV and the summary go to `<predictions location>/<model>/runs/<dag>/<run>/`;
the summary and the gallery of the least confident predictions also go to the
run root, where plugins/ml_predictions.py shows them beside the run.
"""
from __future__ import annotations

import logging
import re

from tasks import artifacts, batch_scoring, scoring_model, storage
from tasks.batch_config import BatchConfig
from tasks.config import safe_name
from tasks.errors import MissingInputError

log = logging.getLogger(__name__)

KEY = re.compile(r"^[0-9a-f]{64}$")


def merge_predictions(cfg: BatchConfig) -> dict:
    """Write the run's predictions, summary and gallery; returns where they are and the headline numbers."""
    import pandas as pd

    (listing_uri,) = artifacts.require(cfg, artifacts.BATCH_LISTING)
    listing = storage.read_json(listing_uri)
    records = [_shard_record(cfg, index) for index in range(len(listing["shards"]))]
    prefixes = [batch_scoring.shard_prefix(cfg.output_root, record["key"]) for record in records]
    shards = [storage.read_json(storage.join(prefix, batch_scoring.SHARD_RECORD)) for prefix in prefixes]
    table = pd.concat([batch_scoring.read_predictions(storage.join(prefix, f"{batch_scoring.PREDICTIONS}.parquet"))
                       for prefix in prefixes], ignore_index=True)
    version = listing["model_version"]
    version_uri = scoring_model.version_uri(cfg.registry, cfg.model_name, version)
    classes = _classes(version_uri)
    unreadable = sorted((item for shard in shards for item in shard["unreadable"]), key=lambda item: item["path"])
    summary = batch_scoring.summarize(table, classes, unreadable, batch_scoring.test_confidences(version_uri),
                                      storage.join(version_uri, batch_scoring.TEST_PREDICTIONS))
    out = storage.join(cfg.output_root, "runs", cfg.dag_id, safe_name(cfg.run_id))
    files = batch_scoring.write_predictions(table, storage.join(out, batch_scoring.PREDICTIONS))
    summary = {"images": listing["images"], "model_name": cfg.model_name, "model_version": version,
               "decoder_version": shards[0]["decoder_version"], "engine": shards[0]["engine"],
               "n_listed": len(listing["paths"]), "other_files": listing["other_files"],
               "n_shards": len(shards), "n_reused_shards": sum(1 for record in records if record["reused"]),
               "predictions": files, **summary}
    storage.write_json(storage.join(out, "summary.json"), summary)
    storage.write_json(cfg.artifact(artifacts.BATCH_SUMMARY), summary)
    storage.write_text(cfg.artifact(artifacts.BATCH_GALLERY), _gallery(cfg, table, summary))
    result = {"n_listed": summary["n_listed"], "n_scored": summary["n_scored"],
              "n_unreadable": summary["n_unreadable"], "n_reused_shards": summary["n_reused_shards"],
              "model_version": version, "shifted": summary["shift"]["shifted"], "predictions": files,
              "summary_uri": storage.join(out, "summary.json")}
    log.info("merge_predictions: %d scored, %d unreadable, %d of %d shards reused, shift: %s -> %s",
             result["n_scored"], result["n_unreadable"], result["n_reused_shards"], len(shards),
             summary["shift"]["status"], out)
    return result


def _shard_record(cfg: BatchConfig, index: int) -> dict:
    uri = cfg.artifact(artifacts.BATCH_SHARD, f"{index}.json")
    if not storage.exists(uri):
        raise MissingInputError(f"run {cfg.run_id!r} has no record of shard {index} (at {uri}); run score_shard "
                                "for it first")
    record = storage.read_json(uri)
    if not KEY.match(str(record.get("key", ""))):
        raise MissingInputError(f"{uri} names no shard key; re-run score_shard {index}")
    return record


def _classes(version_uri: str) -> tuple[str, ...]:
    return tuple(storage.read_json(storage.join(version_uri, scoring_model.SPEC_FILE))["classes"])


def _gallery(cfg: BatchConfig, table, summary: dict) -> str:
    """The gallery page, with thumbnails read again from the source (a file gone since shows no preview)."""
    rows = batch_scoring.least_confident(table, cfg.gallery_size)
    root = batch_scoring.images_root(cfg.images, cfg.cache_dir)
    thumbnails = []
    with batch_scoring.worker_pool() as pool:
        for read in batch_scoring.read_images(root, list(rows["path"]), pool):
            try:
                thumbnails.append(batch_scoring.thumbnail(read.data) if read.data is not None else "")
            except Exception as error:  # a preview is a convenience: the prediction stands without it
                log.warning("merge_predictions: no preview of %s: %s", read.path, error)
                thumbnails.append("")
    title = f"Least confident predictions: {cfg.model_name} {summary['model_version']}, run {cfg.run_id}"
    return batch_scoring.gallery_page(rows, thumbnails, summary, title)
