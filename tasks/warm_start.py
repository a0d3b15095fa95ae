"""Warm start: a retrain's head starts from the champion's when it fits, instead of from random weights.

The champion's head fits when it maps the same features to the same classes:
same backbone spec, image size and dropout, the same classes in the same order,
and a frozen backbone whose weights equal this run's (a fine-tuned champion's
head fits its fine-tuned features, not the pretrained ones feature extraction
trains on). Otherwise the head starts fresh and the reason is logged. The
champion is read through the pointer the pipeline wrote and rebuilt from its
saved spec (tasks.classifier: nothing in it runs as code).
"""
from __future__ import annotations

import logging
from pathlib import Path

from tasks import classifier, registry, storage
from tasks.classifier import Classifier
from tasks.errors import StorageError, StoreUnavailableError, TrainingError
from tasks.feature_store import weights_digest

log = logging.getLogger(__name__)


def champion_head(built: Classifier, publish_uri: str, model_name: str, scratch: Path,
                  cache_dir: str) -> tuple[list | None, str]:
    """(the champion's head weights, why) when they fit `built`, else (None, why not)."""
    champion = registry.read_champion(publish_uri, model_name)
    if champion is None:
        return None, f"no champion of {model_name} yet: fresh head"
    version = str(champion.get("version", ""))
    model_uri = storage.join(registry.version_uri_of(registry.model_root_of(publish_uri, model_name), version),
                             registry.MODEL_DIR)
    spec = classifier.read_spec(storage.download(model_uri.rstrip("/") + "/", scratch / "champion"))
    if spec.classes != built.spec.classes:
        added = [c for c in built.spec.classes if c not in spec.classes]
        removed = [c for c in spec.classes if c not in built.spec.classes]
        return None, (f"classes differ from champion {version}'s (new {added}, removed {removed}"
                      f"{', order changed' if not added and not removed else ''}): fresh head")
    if (spec.backbone, spec.image_size, spec.dropout) != (built.spec.backbone, built.spec.image_size,
                                                          built.spec.dropout):
        return None, (f"champion {version} used {spec.backbone} at {spec.image_size} px, dropout {spec.dropout}: "
                      "fresh head")
    loaded = classifier.load(scratch / "champion", cache_dir)
    if weights_digest(loaded.backbone.model.get_weights()) != weights_digest(built.backbone.model.get_weights()):
        return None, f"champion {version} was fine-tuned (its head fits other features): fresh head"
    return loaded.head.get_weights(), f"warm start from champion {version}'s head"


def warm_start(built: Classifier, publish_uri: str, model_name: str, scratch: Path, cache_dir: str) -> str:
    """Load the champion's head into `built` when it fits; returns what was done and why (also logged)."""
    try:
        weights, reason = champion_head(built, publish_uri, model_name, scratch, cache_dir)
    except (StorageError, StoreUnavailableError, TrainingError) as error:
        weights, reason = None, f"the champion of {model_name} could not be read ({error}): fresh head"
    if weights is not None:
        built.head.set_weights(weights)
    log.info("warm start: %s", reason)
    return reason
