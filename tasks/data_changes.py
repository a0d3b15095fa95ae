"""What changed since the champion was trained: fingerprints, files per class, class priors, embedding shift.

A run is compared with the champion through two records the champion's version
already holds: its data manifest (every selected file with split, class and
sha256; tasks.steps.subsample) and its params (params.json). The data
fingerprint is the manifest's selection hash plus the class order; the config
fingerprint hashes every param that shapes the trained model, leaving out where
the run and the model live. Both equal → nothing to train.

Otherwise the change report says, against the champion's training data:
- files added / removed / changed (same path, other sha256) per class, and new or missing classes;
- a class-prior shift: a chi-square test of homogeneity of the per-class training
  counts (champion vs now), with its p-value;
- an embedding shift: how well a domain classifier (logistic regression on
  backbone features) tells the champion's training images from the images that
  are new since, as a cross-validated ROC AUC, with the noise band the same
  classifier reaches on randomly relabelled domains. An AUC inside the band is
  no detectable shift; 1.0 is data the champion never saw the like of.

Pure functions over manifests, params and arrays: no TensorFlow, no store access.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Iterable

import numpy as np
from threadpoolctl import threadpool_limits

# config fields that say where a run or model lives, not what is trained
PLACE_FIELDS = ("run_root", "dag_id", "run_id", "candidate", "publish_uri", "model_name", "cache_dir")
# params that steer the run, not the model
CONTROL_FIELDS = ("skip_unchanged",)
# which backbone a run trained on is decided by the candidate list; the winner's config replaces these two
CANDIDATE_FIELDS = ("backbone", "image_size")
TRAINING_SPLITS = ("train", "val")
EXAMPLES_PER_LIST = 5
DOMAIN_FOLDS = 5
NOISE_PERMUTATIONS = 5
DOMAIN_STEPS = 200
DOMAIN_L2 = 1e-2
DOMAIN_COMPONENTS = 32  # principal components the domain classifier sees: enough for a shift, few enough to not
                        # memorise a few hundred images
MIN_DOMAIN_IMAGES = 4  # per domain: fewer cannot be cross-validated


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """The selection (split, path, label, file sha256 of every image) and the class order."""
    return _digest({"selection": manifest["hash"], "classes": list(manifest["classes"])})


def config_fingerprint(params: dict[str, Any]) -> str:
    """Every param that shapes the trained model, from a config dict (RunConfig.to_public_dict or params.json).

    The backbone and image size enter as the candidate list they were chosen
    from, so a winner's config and the config that listed it compare equal.
    """
    from tasks.config import RunConfig, candidate_list

    known = {name: value for name, value in params.items() if name in RunConfig.__dataclass_fields__}
    config = RunConfig.from_params({name: value for name, value in known.items() if name not in PLACE_FIELDS})
    training = {name: value for name, value in config.to_public_dict().items()
                if name not in PLACE_FIELDS + CONTROL_FIELDS + CANDIDATE_FIELDS}
    training["candidates"] = [[c.backbone, c.image_size] for c in candidate_list(config)]
    return _digest(training)


def training_files(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{class: {path: sha256}} of the train and val splits (val is carved out of train, so both are training data)."""
    files: dict[str, dict[str, str]] = {name: {} for name in manifest["classes"]}
    for entry in manifest["files"]:
        if entry["split"] in TRAINING_SPLITS:
            files.setdefault(entry["class"], {})[entry["path"]] = entry["sha256"]
    return files


def file_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Training files added, removed and changed per class, and new and missing classes (old → new manifest)."""
    before, after = training_files(old), training_files(new)
    per_class = {}
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name, {}), after.get(name, {})
        added = sorted(set(now) - set(was))
        removed = sorted(set(was) - set(now))
        changed = sorted(path for path in set(was) & set(now) if was[path] != now[path])
        per_class[name] = {"before": len(was), "after": len(now), "added": len(added), "removed": len(removed),
                           "changed": len(changed), "examples": {"added": added[:EXAMPLES_PER_LIST],
                                                                 "removed": removed[:EXAMPLES_PER_LIST],
                                                                 "changed": changed[:EXAMPLES_PER_LIST]}}
    totals = {kind: sum(entry[kind] for entry in per_class.values()) for kind in ("added", "removed", "changed")}
    return {"per_class": per_class, "totals": totals,
            "new_classes": [name for name in new["classes"] if name not in old["classes"]],
            "missing_classes": [name for name in old["classes"] if name not in new["classes"]],
            "class_order_changed": [c for c in new["classes"] if c in old["classes"]]
                                   != [c for c in old["classes"] if c in new["classes"]]}


def new_image_hashes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(sha256 of the champion's training images, sha256 of this run's training images the champion never saw)."""
    seen = {sha for files in training_files(old).values() for sha in files.values()}
    fresh = {sha for files in training_files(new).values() for sha in files.values()} - seen
    return sorted(seen), sorted(fresh)


def prior_shift(old_counts: dict[str, int], new_counts: dict[str, int]) -> dict[str, Any]:
    """Chi-square test of homogeneity of the class distribution (champion's training counts vs now).

    Classes with no images on either side are left out; the p-value is None
    when fewer than two classes remain (nothing to compare).
    """
    from scipy.stats import chi2_contingency

    names = [name for name in sorted(set(old_counts) | set(new_counts))
             if old_counts.get(name, 0) + new_counts.get(name, 0) > 0]
    table = np.array([[old_counts.get(name, 0) for name in names], [new_counts.get(name, 0) for name in names]])
    old_total, new_total = table.sum(axis=1)
    priors = {name: {"before": round(float(table[0, i] / old_total), 4) if old_total else None,
                     "after": round(float(table[1, i] / new_total), 4) if new_total else None}
              for i, name in enumerate(names)}
    if len(names) < 2 or not old_total or not new_total:
        return {"test": "chi-square homogeneity", "chi2": None, "dof": None, "p_value": None, "priors": priors}
    chi2, p_value, dof, _ = chi2_contingency(table, correction=False)
    return {"test": "chi-square homogeneity", "chi2": round(float(chi2), 4), "dof": int(dof),
            "p_value": float(p_value), "priors": priors}


def training_counts(manifest: dict[str, Any]) -> dict[str, int]:
    counts = Counter(entry["class"] for entry in manifest["files"] if entry["split"] in TRAINING_SPLITS)
    return {name: counts.get(name, 0) for name in manifest["classes"]}


def embedding_shift(old: np.ndarray, new: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Domain-classifier AUC (champion's images vs new ones) and its noise band from relabelled domains.

    The classifier is L2-regularised logistic regression on the top principal
    components of the standardised features, scored out of fold (stratified `DOMAIN_FOLDS`-fold). The noise
    band is the range of the same AUC over `NOISE_PERMUTATIONS` random
    relabellings (same domain sizes): what "no shift" looks like at this size.

    BLAS runs on one thread: as fast for these few thousand rows, while a
    multi-threaded OpenBLAS on a busy worker spins for its descheduled threads
    (2.2 s instead of ~50 ms on the shared 2-core VM, in batch scoring's merge).
    """
    if min(len(old), len(new)) < MIN_DOMAIN_IMAGES:
        return {"auc": None, "noise_band": None, "shifted": None, "n_before": len(old), "n_new": len(new),
                "reason": f"fewer than {MIN_DOMAIN_IMAGES} images on a side"}
    with threadpool_limits(limits=1, user_api="blas"):
        return _domain_classifier_auc(old, new, seed)


def _domain_classifier_auc(old: np.ndarray, new: np.ndarray, seed: int) -> dict[str, Any]:
    x = np.concatenate([old, new]).reshape(len(old) + len(new), -1).astype(np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    rng = np.random.default_rng(seed)
    x = _top_components(x, DOMAIN_COMPONENTS, rng)  # labels unseen: the same projection for every fold
    lipschitz = 0.25 * np.linalg.norm(x, ord=2) ** 2  # of the log-loss gradient, on any subset of the rows too
    y = np.concatenate([np.zeros(len(old)), np.ones(len(new))])
    auc = _cross_validated_auc(x, y, rng, lipschitz)
    noise = [_cross_validated_auc(x, rng.permutation(y), rng, lipschitz) for _ in range(NOISE_PERMUTATIONS)]
    band = [round(min(noise), 4), round(max(noise), 4)]
    return {"auc": round(auc, 4), "noise_band": band, "shifted": bool(auc > band[1]), "n_before": len(old),
            "n_new": len(new), "classifier": f"logistic regression, {DOMAIN_FOLDS}-fold cross-validated ROC AUC"}


def _top_components(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """x projected on (close to) its top-k principal directions: a randomized range finder with two power
    iterations, so a few thousand 1280-d features take matrix products, not a full SVD."""
    k = min(k, *x.shape)
    basis, _ = np.linalg.qr(x @ rng.normal(size=(x.shape[1], min(k + 10, *x.shape))))
    for _ in range(2):
        basis, _ = np.linalg.qr(x @ (x.T @ basis))
    u, s, _ = np.linalg.svd(basis.T @ x, full_matrices=False)
    return (basis @ u[:, :k]) * s[:k]


def _cross_validated_auc(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lipschitz: float) -> float:
    folds = np.empty(len(y), dtype=int)
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(y == label))
        folds[members] = np.arange(len(members)) % min(DOMAIN_FOLDS, len(members))
    scores = np.empty(len(y))
    for fold in np.unique(folds):
        held = folds == fold
        w, b = _logistic_fit(x[~held], y[~held], lipschitz)
        scores[held] = x[held] @ w + b
    return _auc(y, scores)


def _logistic_fit(x: np.ndarray, y: np.ndarray, lipschitz: float) -> tuple[np.ndarray, float]:
    """Weights and bias by gradient descent on the mean log-loss plus L2 (balanced classes)."""
    weight = np.where(y == 1, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
    w, b = np.zeros(x.shape[1]), 0.0
    step = 1.0 / (lipschitz * weight.max() + DOMAIN_L2)
    for _ in range(DOMAIN_STEPS):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        error = weight * (p - y)
        w -= step * (x.T @ error + DOMAIN_L2 * w)
        b -= step * error.sum()
    return w, b


def _auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half)."""
    ranks = _average_ranks(scores)
    positives = y == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average (scipy.stats.rankdata's default, without importing SciPy)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[starts, len(values)])
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(starts + (counts + 1) / 2, counts)
    return ranks


def summary_line(changes: dict[str, Any]) -> str:
    """One line for logs and the approval request: what changed since the champion."""
    files = changes.get("files")
    if files is None:
        return changes.get("reason", "")
    parts = [f"+{files['totals']['added']} / -{files['totals']['removed']} / ~{files['totals']['changed']} "
             "training images"]
    if files["new_classes"]:
        parts.append(f"new classes {files['new_classes']}")
    if files["missing_classes"]:
        parts.append(f"missing classes {files['missing_classes']}")
    prior = changes.get("prior_shift") or {}
    if prior.get("p_value") is not None:
        parts.append(f"class-prior shift p={prior['p_value']:.3g}")
    shift = changes.get("embedding_shift") or {}
    if shift.get("auc") is not None:
        parts.append(f"embedding shift AUC {shift['auc']:.3f} (noise {shift['noise_band'][0]:.3f}-"
                     f"{shift['noise_band'][1]:.3f})")
    if changes.get("config_changed"):
        parts.append("config changed")
    return f"since champion {changes['champion_version']}: " + ", ".join(parts)


def fingerprints(manifest: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    return {"data": data_fingerprint(manifest), "config": config_fingerprint(params)}


def changed_fields(old_params: dict[str, Any], new_params: dict[str, Any],
                   ignore: Iterable[str] = PLACE_FIELDS + CONTROL_FIELDS) -> list[str]:
    """The params whose values differ (a hint next to the config fingerprint)."""
    skip = set(ignore)
    return sorted(name for name in set(old_params) | set(new_params)
                  if name not in skip and old_params.get(name) != new_params.get(name))


def markdown(changes: dict[str, Any]) -> str:
    """The "Changes since the champion" section of the model card and report."""
    lines = ["## Changes since the champion"]
    if changes.get("champion_version") is None:
        return "\n".join([*lines, changes.get("reason", "no champion to compare with")])
    lines.append(f"Compared with champion `{changes['champion_version']}`: data "
                 f"{'changed' if changes.get('data_changed') else 'unchanged'}, config "
                 f"{'changed' if changes.get('config_changed') else 'unchanged'}"
                 + (f" ({', '.join(changes['changed_params'])})" if changes.get("changed_params") else "") + ".")
    files = changes.get("files")
    if files:
        lines += ["", "| class | before | after | added | removed | changed |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c['before']} | {c['after']} | {c['added']} | {c['removed']} | {c['changed']} |"
                  for name, c in files["per_class"].items()]
        if files["new_classes"] or files["missing_classes"]:
            lines += ["", f"New classes: {files['new_classes'] or 'none'}; missing classes: "
                          f"{files['missing_classes'] or 'none'}."]
    prior = changes.get("prior_shift") or {}
    if prior.get("p_value") is not None:
        lines += ["", f"Class priors: chi-square {prior['chi2']} on {prior['dof']} degrees of freedom, "
                      f"p = {prior['p_value']:.3g} (small p: the class balance moved)."]
    shift = changes.get("embedding_shift") or {}
    if shift.get("auc") is not None:
        lines += ["", f"Embedding shift: a domain classifier tells the new training images from the champion's with "
                      f"cross-validated AUC {shift['auc']:.3f}; relabelled at random it reaches "
                      f"{shift['noise_band'][0]:.3f}-{shift['noise_band'][1]:.3f} (no shift looks like that band, "
                      f"1.0 is data unlike anything the champion saw)."]
    elif shift.get("reason"):
        lines += ["", f"Embedding shift: not measured ({shift['reason']})."]
    return "\n".join(lines)


def held(judgement: dict[str, Any], changes: dict[str, Any] | None, auc_threshold: float) -> dict[str, Any]:
    """A promotion judgement, made ineligible (with the reason) when the data shifted beyond the threshold."""
    reason = shift_hold(changes, auc_threshold)
    if not reason or not judgement.get("eligible"):
        return judgement
    return {**judgement, "eligible": False,
            "reason": f"held: {reason}; have a human approve it (TLP_APPROVAL_MODELS) after a look at the data"}


def shift_hold(changes: dict[str, Any] | None, auc_threshold: float) -> str:
    """Why promotion should wait for the shift ("" when it need not): the embedding-shift AUC is above the
    deployment's threshold (TLP_SHIFT_AUC_THRESHOLD; 0 = never hold) and outside its noise band."""
    shift = (changes or {}).get("embedding_shift") or {}
    if not auc_threshold or shift.get("auc") is None:
        return ""
    if shift["auc"] > auc_threshold and shift.get("shifted"):
        return (f"embedding shift AUC {shift['auc']:.3f} since champion {changes['champion_version']} is above "
                f"TLP_SHIFT_AUC_THRESHOLD={auc_threshold:g}")
    return ""
