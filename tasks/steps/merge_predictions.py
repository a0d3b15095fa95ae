"""Batch step 3: merge the shards' predictions, summarise the batch, and build the UI's gallery.

Which shards belong to the run comes from the run root (the listing and one
record per shard), never from what the mapped tasks returned. The merged
Parquet and CSV and the summary go to `<predictions location>/<model>/runs/<dag>/<run>/`;
the summary and the gallery of the least confident predictions also go to the
run root, where plugins/ml_predictions.py shows them beside the run.

The embedding shift compares the shards' embedding samples (merged into one
sample of the batch) with the version's reference sample of training embeddings,
verified against the version's checksums; a version published without one, or
scored by an engine without embeddings, gets the reason in the summary instead.
"""
from __future__ import annotations

import logging
import re

from tasks import artifacts, batch_scoring, embedding_reference, scoring_model, storage
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
    embedding = _embedding_shift(cfg, version, shards, prefixes, table)
    summary = batch_scoring.summarize(table, classes, unreadable, batch_scoring.test_confidences(version_uri),
                                      storage.join(version_uri, batch_scoring.TEST_PREDICTIONS), embedding)
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
              "model_version": version, "shifted": summary["shift"]["shifted"],
              "embedding_shifted": summary["embedding_shift"]["shifted"],
              "embedding_auc": summary["embedding_shift"]["auc"], "predictions": files,
              "summary_uri": storage.join(out, "summary.json")}
    log.info("merge_predictions: %d scored, %d unreadable, %d of %d shards reused, confidence shift: %s, "
             "embedding shift: %s (AUC %s) -> %s", result["n_scored"], result["n_unreadable"],
             result["n_reused_shards"], len(shards), summary["shift"]["status"], summary["embedding_shift"]["status"],
             summary["embedding_shift"]["auc"], out)
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


def _embedding_shift(cfg: BatchConfig, version: str, shards: list[dict], prefixes: list[str], table) -> dict:
    """The batch's embedding sample against the version's reference sample (never fatal when either is missing)."""
    missing = [shard["key"][:12] for shard in shards if shard["n_scored"] and not shard.get("embedding_sample")]
    if missing:
        return batch_scoring.batch_embedding_shift(
            None, None, f"the scoring model of version {version} yields no embeddings (shards {', '.join(missing)}); "
            "versions published with tasks/tflite_export.py's scoring model and a SavedModel with serve_embeddings do")
    reference = scoring_model.fetch_reference(cfg.registry, cfg.model_name, version, cfg.cache_dir)
    if reference is None:
        return batch_scoring.batch_embedding_shift(
            None, None, f"version {version} was published without a reference sample of training embeddings "
            f"({embedding_reference.FILE}); versions published since the embedding shift was added have one")
    sha256_of = dict(zip(table["path"], table["sha256"], strict=True))
    samples = [batch_scoring.read_embedding_sample(shard["embedding_sample"],
                                                   storage.join(prefix, batch_scoring.EMBEDDINGS))
               for shard, prefix in zip(shards, prefixes, strict=True) if shard.get("embedding_sample")]
    return batch_scoring.batch_embedding_shift(embedding_reference.load(reference),
                                               batch_scoring.merged_sample(samples, sha256_of))


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
