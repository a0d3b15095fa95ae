"""Check changes: what is new since the champion, and whether there is anything to train at all.

Runs after subsample, before any training. It compares this run's manifest and
params with those the champion's version holds (manifest.json, params.json;
tasks.data_changes): when both fingerprints are equal the run ends here,
visibly ("data and config unchanged since champion <version>: nothing to
train"), unless `skip_unchanged` is off. It ends as well when they equal those
of the newest version already published and judged, promoted or not ("data and
config unchanged since version <v> (judged: not promoted, <reason>): nothing to
train"): training again would only publish the same model again. Both records
are read from the registry and matched against the version's checksums.json,
never taken from XCom or the conf. Otherwise it writes the change report
(`data/changes.json`): files added / removed / changed per class, new and
missing classes, the class-prior shift with its chi-square p-value, and the
embedding shift of the new images in the champion's backbone's feature space.

The embedding shift reads features from the shared feature store
(tasks.feature_store): the champion's training images are there from its own
run, and this run's images go through the backbone once here, into the store,
where training then finds them. The champion's records are read from the
registry the pipeline wrote; a missing, unreadable or unverified one means "train".
"""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from tasks import artifacts, data_changes, registry, settings, storage
from tasks.config import RunConfig
from tasks.errors import ConfigError
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

MAX_SHIFT_IMAGES = 1000  # per side: the domain classifier's sample


def check_changes(cfg: RunConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Compare data and config with the champion's; returns `train` (False = nothing to do), why, and the report."""
    manifest = artifacts.read_manifest(cfg, data)
    params = _auto_size_resolved(cfg.to_public_dict(), manifest)
    report = {"fingerprints": data_changes.fingerprints(manifest, params), "champion_version": None}
    champion = _champion_records(cfg)
    same_as_champion = champion is not None and _same(manifest, params, champion) == (True, True)
    newest = {} if same_as_champion or not cfg.skip_unchanged else _unchanged_since_newest(cfg, manifest, params,
                                                                                          champion)
    if newest:  # ends here: no change report (its embedding shift would run the backbone)
        report.update(newest, champion_version=champion["version"] if champion else None)
    elif champion is None:
        report.update(train=True, reason=f"no champion of {cfg.model_name} yet (or its records are unreadable): "
                                         "train from scratch")
    else:
        report.update(_compare(cfg, manifest, params, champion))
    uri = cfg.artifact(artifacts.CHANGES)
    storage.write_json(uri, report)
    log.info("check_changes: %s -> %s", report["reason"], uri)
    return {"train": report["train"], "reason": report["reason"], "uri": uri,
            "champion_version": report["champion_version"], "judged_version": report.get("judged_version")}


def recorded_changes(cfg: RunConfig) -> dict[str, Any] | None:
    """The change report this run wrote, or None when check_changes did not run."""
    uri = cfg.artifact(artifacts.CHANGES)
    return storage.read_json(uri) if storage.exists(uri) else None


def changes_note(cfg: RunConfig) -> str:
    """What the approval request adds about the data: one line since the champion, or "" when nothing was compared."""
    changes = recorded_changes(cfg)
    if not changes or not changes.get("files"):
        return ""
    return f"\n\nData: {data_changes.summary_line(changes)}."


def _auto_size_resolved(params: dict[str, Any], manifest: dict) -> dict[str, Any]:
    """Params with image_size auto (None) as the candidates step decides it from the manifest: a champion's
    params.json holds the size it ran at, and the same data gives the same size."""
    from tasks.config import auto_image_size

    return params if params.get("image_size") is not None else {**params, "image_size": auto_image_size(manifest)[0]}


def _same(manifest: dict, params: dict, recorded: dict) -> tuple[bool, bool]:
    """(same data, same config) as a version's recorded manifest and params."""
    same_data = data_changes.data_fingerprint(recorded["manifest"]) == data_changes.data_fingerprint(manifest)
    try:
        same_config = data_changes.config_fingerprint(
            _auto_size_resolved(recorded["params"], recorded["manifest"])) == data_changes.config_fingerprint(params)
    except ConfigError as error:  # the version's params no longer validate: a config from older rules
        log.warning("check_changes: version %s params do not validate now (%s); config counts as changed",
                    recorded["version"], error)
        same_config = False
    return same_data, same_config


def _compare(cfg: RunConfig, manifest: dict, params: dict, champion: dict) -> dict[str, Any]:
    old_manifest, version = champion["manifest"], champion["version"]
    old_params = _auto_size_resolved(champion["params"], old_manifest)
    same_data, same_config = _same(manifest, params, champion)
    report: dict[str, Any] = {"champion_version": version, "data_changed": not same_data,
                              "config_changed": not same_config,
                              "changed_params": [] if same_config else data_changes.changed_fields(old_params, params)}
    if same_data and same_config:
        reason = f"data and config unchanged since champion {version}: nothing to train"
        if not cfg.skip_unchanged:
            return {**report, "train": True, "reason": reason.replace("nothing to train", "training anyway "
                                                                      "(skip_unchanged is off)")}
        return {**report, "train": False, "reason": reason}
    report["files"] = data_changes.file_changes(old_manifest, manifest)
    report["prior_shift"] = data_changes.prior_shift(data_changes.training_counts(old_manifest),
                                                     data_changes.training_counts(manifest))
    report["embedding_shift"] = _embedding_shift(cfg, old_manifest, manifest, old_params)
    report["train"] = True
    report["reason"] = data_changes.summary_line(report)
    return report


def _unchanged_since_newest(cfg: RunConfig, manifest: dict, params: dict,
                            champion: dict | None) -> dict[str, Any]:
    """When data and config equal those of the newest published and judged version (not the champion: that was
    compared already), the run ends: {train: False, reason, judged_version}; else nothing to change ({})."""
    model_root = registry.model_root_of(cfg.publish_uri, cfg.model_name)
    try:
        version = registry.newest_judged_version(model_root)
    except (storage.StorageError, registry.PublishError) as error:
        log.warning("check_changes: the published versions could not be listed (%s); training", error)
        return {}
    if version is None or (champion is not None and version == champion["version"]):
        return {}
    newest = _version_records(cfg, version)
    if newest is None or _same(manifest, params, newest) != (True, True):
        return {}
    return {"train": False, "judged_version": version,
            "reason": f"data and config unchanged since version {version} (judged: {_verdict(model_root, version)}): "
                      "nothing to train"}


def _verdict(model_root: str, version: str) -> str:
    """What became of a judged version: its promotion decision, or its judgement while none is recorded."""
    decision = registry.recorded_decision(model_root, version)
    if decision is not None:
        return f"{'promoted' if decision['promoted'] else 'not promoted'}, {decision['reason']}"
    judgement = registry.read_judgement(model_root, version) or {}
    return (f"{'eligible' if judgement.get('eligible') else 'not eligible'}, no promotion decision recorded yet, "
            f"{judgement.get('reason', 'no reason recorded')}")


def _champion_records(cfg: RunConfig) -> dict[str, Any] | None:
    """The champion's version, manifest and params, or None (no champion yet, or records unreadable)."""
    champion = registry.read_champion(cfg.publish_uri, cfg.model_name)
    if champion is None:
        return None
    return _version_records(cfg, str(champion.get("version", "")))


def _version_records(cfg: RunConfig, version: str) -> dict[str, Any] | None:
    """A complete version's manifest and params, each matched against its checksums.json, or None (unreadable or
    not matching: the run then trains)."""
    try:
        version_uri = registry.version_uri_of(registry.model_root_of(cfg.publish_uri, cfg.model_name),
                                              registry.check_version_id(version))
        return {"version": version,
                "manifest": registry.read_verified_json(version_uri, registry.MANIFEST_FILE),
                "params": registry.read_verified_json(version_uri, registry.PARAMS_FILE)}
    except (storage.StorageError, registry.PublishError, ValueError) as error:
        log.warning("check_changes: version %s has no readable, verified manifest/params (%s); treating as changed",
                    version, error)
        return None


def _embedding_shift(cfg: RunConfig, old_manifest: dict, manifest: dict, old_params: dict) -> dict[str, Any]:
    """Domain-classifier AUC of the champion's training images vs the new ones, in the champion backbone's
    features (from the store; this run's images are computed into it)."""
    seen, fresh = data_changes.new_image_hashes(old_manifest, manifest)
    if not fresh:
        return {"auc": None, "reason": "no new training images"}
    from tasks import activation_cache, feature_store
    from tasks.backbone_split import split_backbone
    from tasks.backbones import load_backbone
    from tasks.training import TRAINING_SPLITS, stage_records

    backbone = load_backbone(old_params["backbone"], int(old_params["image_size"]),
                             old_params.get("backbone_weights", "imagenet"), cfg.cache_dir)
    whole = split_backbone(backbone, 0)
    key = activation_cache.cache_key(backbone, whole, manifest["hash"])
    store = feature_store.FeatureStore(*settings.load().feature_store_args())
    space = feature_store.namespace(activation_cache.store_key(key))
    with scratch_dir("check_changes") as scratch:
        records = stage_records(cfg, scratch, TRAINING_SPLITS)
        activation_cache.cache_activations(whole.bottom, records, scratch / "features", key, cfg.batch_size, store)
        meta = json.loads((scratch / "features" / activation_cache.META).read_text())
    computed = sum(split["computed"] for split in meta["splits"].values())
    rng = np.random.default_rng(cfg.seed)
    old = _sample_features(store, space, seen, rng)
    new = _sample_features(store, space, fresh, rng)
    return {**data_changes.embedding_shift(old, new, cfg.seed), "backbone": old_params["backbone"],
            "image_size": int(old_params["image_size"]), "backbone_images": computed}


def _sample_features(store, space: str, hashes: list[str], rng: np.random.Generator) -> np.ndarray:
    """Up to MAX_SHIFT_IMAGES stored features of these images (ones the store no longer holds are left out)."""
    picked = rng.permutation(len(hashes))[:MAX_SHIFT_IMAGES]
    arrays = [array for array in (store.get(space, hashes[i]) for i in picked) if array is not None]
    return np.stack(arrays) if arrays else np.zeros((0, 1), np.float32)
