"""Warm start: a retrain's head starts from the champion's when it fits, instead of from random weights.

The champion's head fits when it maps the same features to the same classes:
same backbone spec, image size and dropout, the same classes in the same order,
and a frozen backbone whose weights equal this run's (a fine-tuned champion's
head fits its fine-tuned features, not the pretrained ones feature extraction
trains on). Otherwise the head starts fresh and the reason is logged. The
champion is read through the pointer the pipeline wrote and rebuilt from its
saved spec (tasks.classifier: nothing in it runs as code).

Fine-tuning warm-starts too (`champion_top`): when the champion was fine-tuned
on the same classes, backbone, image size and dropout, and everything it left
frozen includes everything this run leaves frozen (its weights below this run's
cut equal this run's: the ImageNet weights, compared by digest), fine-tune
starts from the champion's fine-tuned top and its head, which was trained on
that top: the champion itself, trained on. Only the top's weights are loaded;
the bottom is never touched, so the boundary activations (the run's cache, and
the feature store keyed by a digest of the bottom's weights) stay what the
ImageNet bottom computes. Feature extraction stays on the ImageNet backbone:
a fine-tuned champion's head fits its own fine-tuned features, so feature
extraction starts a fresh head then.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import classifier, registry, storage
from tasks.classifier import Classifier
from tasks.errors import PublishError, StorageError, StoreUnavailableError, TrainingError
from tasks.feature_store import weights_digest

if TYPE_CHECKING:
    from tasks.backbone_split import Split

log = logging.getLogger(__name__)


def _fitting_champion(built: Classifier, champion: dict | None, publish_uri: str, model_name: str, scratch: Path,
                      fallback: str) -> tuple[str, str | None]:
    """(champion version, None) when the spec of `champion` (its pointer, registry.read_champion) fits `built`
    (downloaded to scratch/champion), else (version or "", why not, ending in `fallback`)."""
    if champion is None:
        return "", f"no champion of {model_name} yet: {fallback}"
    version = str(champion.get("version", ""))
    model_uri = storage.join(registry.version_uri_of(registry.model_root_of(publish_uri, model_name),
                                                     registry.check_version_id(version)), registry.MODEL_DIR)
    spec = classifier.read_spec(storage.download(model_uri.rstrip("/") + "/", scratch / "champion"))
    if spec.classes != built.spec.classes:
        added = [c for c in built.spec.classes if c not in spec.classes]
        removed = [c for c in spec.classes if c not in built.spec.classes]
        return version, (f"classes differ from champion {version}'s (new {added}, removed {removed}"
                         f"{', order changed' if not added and not removed else ''}): {fallback}")
    if (spec.backbone, spec.image_size, spec.dropout) != (built.spec.backbone, built.spec.image_size,
                                                          built.spec.dropout):
        return version, (f"champion {version} used {spec.backbone} at {spec.image_size} px, dropout {spec.dropout}: "
                         f"{fallback}")
    return version, None


def champion_head(built: Classifier, champion: dict | None, publish_uri: str, model_name: str, scratch: Path,
                  cache_dir: str) -> tuple[list | None, str]:
    """(the champion's head weights, why) when they fit `built`, else (None, why not)."""
    version, why_not = _fitting_champion(built, champion, publish_uri, model_name, scratch, "fresh head")
    if why_not is not None:
        return None, why_not
    loaded = classifier.load(scratch / "champion", cache_dir)
    if weights_digest(loaded.backbone.model.get_weights()) != weights_digest(built.backbone.model.get_weights()):
        return None, f"champion {version} was fine-tuned (its head fits other features): fresh head"
    return loaded.head.get_weights(), f"warm start from champion {version}'s head"


def warm_start(built: Classifier, champion: Future, publish_uri: str, model_name: str, scratch: Path,
               cache_dir: str) -> str:
    """Load the champion's head into `built` when it fits; returns what was done and why (also logged).

    `champion` is registry.read_champion(publish_uri, model_name) running on a thread: the step starts it
    first, so its S3 client set-up and round trip overlap the backbone's build and the feature extraction."""
    try:
        weights, reason = champion_head(built, champion.result(), publish_uri, model_name, scratch, cache_dir)
    except (StorageError, StoreUnavailableError, TrainingError, PublishError) as error:
        weights, reason = None, f"the champion of {model_name} could not be read ({error}): fresh head"
    if weights is not None:
        built.head.set_weights(weights)
    log.info("warm start: %s", reason)
    return reason


FROM_FEATURE_EXTRACTION = "fine-tune starts from feature extraction's model"


def champion_top(built: Classifier, split: Split, fine_tune_layers: int, publish_uri: str, model_name: str,
                 scratch: Path, cache_dir: str) -> tuple[tuple[list, list] | None, str]:
    """(the champion's top weights above `split`'s cut and its head weights, why) when the champion was fine-tuned
    above this cut with the same frozen bottom; else (None, why not)."""
    from tasks.backbone_split import split_backbone

    version, why_not = _fitting_champion(built, registry.read_champion(publish_uri, model_name), publish_uri,
                                         model_name, scratch, FROM_FEATURE_EXTRACTION)
    if why_not is not None:
        return None, why_not
    loaded = classifier.load(scratch / "champion", cache_dir)
    theirs = split_backbone(loaded.backbone, fine_tune_layers)
    if theirs.cut != split.cut:  # same backbone and count: cannot happen unless the split rules changed
        return None, f"champion {version}'s backbone cuts before {theirs.cut}, not {split.cut}: " + \
            FROM_FEATURE_EXTRACTION
    if weights_digest(theirs.bottom.get_weights()) != weights_digest(split.bottom.get_weights()):
        return None, (f"champion {version} was fine-tuned below this run's cut (before {split.cut}) or on other "
                      f"pretrained weights: its top fits other activations: {FROM_FEATURE_EXTRACTION}")
    top = theirs.top.get_weights()
    if weights_digest(top) == weights_digest(split.top.get_weights()):
        return None, f"champion {version} was not fine-tuned: {FROM_FEATURE_EXTRACTION}"
    return (top, loaded.head.get_weights()), (f"warm start from champion {version}'s fine-tuned top (above "
                                              f"{split.cut}) and head")


def warm_start_top(built: Classifier, split: Split, fine_tune_layers: int, publish_uri: str, model_name: str,
                   scratch: Path, cache_dir: str) -> str:
    """Load the champion's fine-tuned top and head into `built` (its top only: the bottom stays as it is) when
    they fit; returns what was done and why (also logged)."""
    try:
        weights, reason = champion_top(built, split, fine_tune_layers, publish_uri, model_name, scratch, cache_dir)
    except (StorageError, StoreUnavailableError, TrainingError, PublishError) as error:
        weights, reason = None, f"the champion of {model_name} could not be read ({error}): {FROM_FEATURE_EXTRACTION}"
    if weights is not None:
        split.top.set_weights(weights[0])
        built.head.set_weights(weights[1])
    log.info("warm start (fine-tune): %s", reason)
    return reason
