"""Batch step 2: score one shard of the listing with the published model (a mapped task per shard).

The shard's predictions go to `<predictions location>/<model>/shards/<content key>/`,
the key made of the model version, decoder version, scorer, top-k and every
image's path and sha256. A key that already has its `shard.json` was scored
before, by this run (a retry) or any other: it is reused, not scored again. A
changed image changes the key. Unreadable files are listed with the reason,
never fatal. The run root gets one record per shard naming its key, which is
what merge_predictions reads.

Files are hashed first and read again batch by batch when scored (tasks.batch_scoring):
memory holds a batch per lane (one per core), not the shard. Beside the predictions the shard
keeps the embeddings of a bounded, deterministic sample of its images
(`embeddings.npy`, named with its sha256 in `shard.json`), for the run's embedding shift.
"""
from __future__ import annotations

import logging
import time

from tasks import artifacts, batch_scoring, images, scoring_model, storage
from tasks.batch_config import BatchConfig
from tasks.errors import MissingInputError

log = logging.getLogger(__name__)


def score_shard(cfg: BatchConfig, shard: dict) -> dict:
    """Score (or reuse) shard `shard["index"]` of the run's listing; returns its key and counts."""
    (listing_uri,) = artifacts.require(cfg, artifacts.BATCH_LISTING)
    listing = storage.read_json(listing_uri)
    index = int(shard["index"])
    if not 0 <= index < len(listing["shards"]):
        raise MissingInputError(f"shard {index} is not in the listing of run {cfg.run_id!r} "
                                f"({len(listing['shards'])} shards); re-run list_images")
    start, end = listing["shards"][index]
    paths = listing["paths"][start:end]
    started = time.monotonic()
    model = scoring_model.fetch(cfg.registry, cfg.model_name, listing["model_version"], cfg.cache_dir)
    root = batch_scoring.images_root(cfg.images, cfg.cache_dir)
    reads = batch_scoring.hash_images(root, paths)
    key = batch_scoring.shard_key(model.version_uri, images.DECODER_VERSION, cfg.top_k, reads)
    prefix = batch_scoring.shard_prefix(cfg.output_root, key)
    record_uri = storage.join(prefix, batch_scoring.SHARD_RECORD)
    reused = storage.exists(record_uri)
    if reused:
        record = storage.read_json(record_uri)
    else:
        scored, probabilities, embeddings, unreadable = batch_scoring.score(
            root, reads, model.image_size, scoring_model.lanes(model))
        table = batch_scoring.predictions_table(scored, probabilities, model.classes, cfg.top_k,
                                                model.model_name, model.version, images.DECODER_VERSION)
        files = batch_scoring.write_predictions(table, storage.join(prefix, batch_scoring.PREDICTIONS))
        sample = None
        if embeddings is not None:
            sample = batch_scoring.write_embedding_sample(
                *batch_scoring.embedding_sample(scored, embeddings),
                storage.join(prefix, batch_scoring.EMBEDDINGS))
        record = {"key": key, "n_images": len(paths), "n_scored": len(scored), "unreadable": unreadable,
                  "model_version": model.version, "decoder_version": images.DECODER_VERSION,
                  "engine": model.engine, "files": files, "embedding_sample": sample}
        storage.write_json(record_uri, record)
    result = {"index": index, "key": key, "n_images": len(paths), "n_scored": record["n_scored"],
              "n_unreadable": len(record["unreadable"]), "reused": reused}
    storage.write_json(cfg.artifact(artifacts.BATCH_SHARD, f"{index}.json"), {**result, "uri": prefix})
    seconds = time.monotonic() - started
    log.info("score_shard %d: %s %d images (%d unreadable) with %s %s (%s) in %.1f s (%.0f images/s) -> %s", index,
             "reused" if reused else "scored", len(paths), result["n_unreadable"], model.model_name, model.version,
             model.engine, seconds, len(paths) / max(seconds, 1e-9), prefix)
    return result
