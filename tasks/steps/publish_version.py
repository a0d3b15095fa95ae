"""Step 7a: publish the evaluated model as a verified version and judge whether it may replace the champion.

`publish_version` checks that what would be served answers like what was evaluated (a fresh
process rebuilds the classifier from model/ and loads the SavedModel's serving signature and reproduces
evaluate's golden batch), converts and measures the TFLite variants, uploads the verified
version (tasks.registry's layout), and judges whether it MAY be promoted (tasks.promotion).
The promote step (tasks.steps.promote) then moves the pointer, where a human approved if asked.

A re-run of publish for the same run and model finds its version by the id's suffix and reuses it
(no second version, and no second decision once one is recorded). A model retrained within the
same run is a new version.

Store failures raise tasks.storage.StorageError (naming the URI and what to check); one
authenticated call comes before any upload, so bad credentials or a dead endpoint leave
nothing behind. A missing bucket is created, with a warning naming it (a typo in
publish_uri shows up there).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tasks import (
    artifacts,
    classifier,
    embedding_reference,
    model_card,
    promotion,
    registry,
    report,
    serving_check,
    serving_export,
    settings,
    storage,
    tflite_export,
)
from tasks.config import RunConfig
from tasks.errors import PublishError
from tasks.phases import FEATURE_EXTRACTION
from tasks.records import iter_records
from tasks.registry import (
    CHECKSUMS,
    MANIFEST_FILE,
    METRIC,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_DIR,
    PARAMS_FILE,
    PREDICTIONS_FILE,
    REPORT_DIR,
    SAVED_MODEL_DIR,
    TEST_RECORDS,
    TFLITE_DIR,
)
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

# what the run root must hold, and the name each input gets inside a version (with MODEL_DIR: the model
# evaluate kept, artifacts.MODELS[metrics["kept"]])
INPUTS = {
    METRICS_FILE: artifacts.METRICS,
    REPORT_DIR: artifacts.REPORT,
    MODEL_CARD_FILE: artifacts.MODEL_CARD,
    MANIFEST_FILE: artifacts.MANIFEST,
}
TEST_SPLIT = promotion.TEST_SPLIT
RUN_HASH_CHARS = 12
TOLERANCE = promotion.TOLERANCE


def publish_version(cfg: RunConfig, evaluation: dict | None = None) -> dict:
    """Upload this run's model as a verified version and judge whether it may replace the champion.

    `evaluation` is the evaluate step's result; when given, its accuracy must match the
    run root's metrics.json (a stale metrics file would otherwise be published), and its per-image
    predictions spare the judge a pass over the test split once the published model is shown to
    give them (`_evaluated_answers`). Before anything is uploaded, the serving check must pass,
    the TFLite variants are made and the
    candidate is judged against the champion on test images it did not choose (tasks.promotion);
    the model card carries that verdict. The judgement is recorded in the store
    (`judgements/<version>.json`), where promote reads it; the returned dict (the same fields)
    is for the approval request and the logs.
    """
    inputs, golden_uri, test_uri = _run_inputs(cfg)
    model_root = registry.model_root_of(cfg.publish_uri, cfg.model_name)
    if storage.ensure_bucket(cfg.publish_uri):
        log.warning("publish: bucket of %s did not exist and was created; check publish_uri if that is a surprise",
                    cfg.publish_uri)
    evaluation_set = settings.load().evaluation_set(cfg.model_name)
    with scratch_dir("publish") as scratch:
        stage = scratch / "version"
        for name, uri in inputs.items():
            storage.download(uri, stage / name)
        metrics = json.loads((stage / METRICS_FILE).read_text())
        _check_metrics(metrics, json.loads((stage / MANIFEST_FILE).read_text()), evaluation)
        model_sha256 = storage.sha256_file(stage / MODEL_DIR / classifier.WEIGHTS_FILE)
        version, complete = _version_for(model_root, cfg.run_id, model_sha256)
        version_uri = registry.version_uri_of(model_root, version)
        test_records = storage.download(test_uri, scratch / f"{TEST_SPLIT}.tfrecord")
        classes = list(metrics["classes"])
        champion = registry.champion_at(model_root)
        judgement = registry.read_judgement(model_root, version)
        if complete and judgement is not None:
            log.info("publish: %s is already published, verified and judged; not uploading or judging again",
                     version_uri)
        elif complete:
            log.info("publish: %s is already published and verified; judging it (its judgement was not recorded)",
                     version_uri)
            metrics = storage.read_json(storage.join(version_uri, METRICS_FILE))
            judged, _ = promotion.judge(champion, classes, storage.join(version_uri, SAVED_MODEL_DIR),
                                        promotion.recorded_predictions(version_uri), test_records, evaluation_set,
                                        cfg.batch_size, scratch)
        else:
            golden = storage.download(golden_uri, scratch / "golden.npz")
            metrics, float32 = _checked_stage(cfg, stage, metrics, golden, test_records, version_uri)
            known = _evaluated_answers(cfg, evaluation, float32, test_records, classes)
            if judgement is None:
                judged, predictions = promotion.judge(champion, classes, stage / SAVED_MODEL_DIR, known, test_records,
                                                      evaluation_set, cfg.batch_size, scratch)
            else:  # an interrupted upload of a version judged before: the judgement stands, its answers are redone
                log.info("publish: re-uploading %s, judged before at %s", version_uri, judgement["judged_at"])
                judged = judgement
                own = promotion.judging_set(classes, test_records, None, evaluation_set, scratch)
                predictions = promotion.score_missing(stage / SAVED_MODEL_DIR, classes, own, known, cfg.batch_size,
                                                      scratch)
            _finish_stage(cfg.model_name, stage, metrics, judged, predictions, test_records)
            _upload_verified(stage, version_uri)
        if judgement is None:
            judgement = {
                **judged,
                "version": version,
                "version_uri": version_uri,
                "model_name": cfg.model_name,
                "dag_id": cfg.dag_id,
                "run_id": cfg.run_id,
                "classes": classes,
                "test_accuracy": float(metrics[METRIC]),
                "report_uri": storage.join(version_uri, REPORT_DIR, "index.html"),
                "model_card_uri": storage.join(version_uri, MODEL_CARD_FILE),
                "serving_check": metrics["serving_check"],
                "tflite": tflite_summary(metrics["tflite"]),
                "judged_at": datetime.now(timezone.utc).isoformat(),
            }
            registry.write_judgement(model_root, judgement)
    log.info("publish: %s published; %s to promote (%s)", version_uri, "eligible" if judgement["eligible"] else
             "not eligible", judgement["reason"])
    storage.write_json(cfg.artifact(artifacts.JUDGEMENT), judgement)
    return judgement


def tflite_summary(section: dict) -> dict:
    """The TFLite numbers worth showing (report, model card, approval): status and per variant
    accuracy, size, latency and whether it was kept."""
    fields = ("accuracy", "size_bytes", "latency_ms", "kept", "reason")
    return {"status": section["status"],
            "variants": {name: {key: entry[key] for key in fields if key in entry}
                         for name, entry in section["variants"].items()}}


def _run_inputs(cfg: RunConfig) -> tuple[dict[str, str], str, str]:
    """The version's inputs by name in the version, the golden batch, and the test split: all checked up
    front, so a missing one fails before any upload."""
    *uris, golden, test = artifacts.require(cfg, *INPUTS.values(), artifacts.GOLDEN,
                                            artifacts.split_records(TEST_SPLIT))
    kept = storage.read_json(uris[0]).get("kept", FEATURE_EXTRACTION)
    (model,) = artifacts.require(cfg, artifacts.MODELS[kept])
    return {MODEL_DIR: model, **dict(zip(INPUTS, uris, strict=False))}, golden, test


def _check_metrics(metrics: dict, manifest: dict, evaluation: dict | None) -> None:
    """Refuse metrics computed on another data selection, or older than the evaluation that ran."""
    if metrics.get("manifest_hash") != manifest["hash"]:
        raise PublishError(f"metrics.json was computed on data selection {metrics.get('manifest_hash')!r}, "
                           f"but manifest.json is {manifest['hash']!r}; re-run evaluate for this run")
    if list(metrics["classes"]) != list(manifest["classes"]):
        raise PublishError(f"metrics.json classes {metrics['classes']} differ from manifest.json classes "
                           f"{manifest['classes']}; re-run evaluate for this run")
    if evaluation is not None and "accuracy" in evaluation \
            and not math.isclose(evaluation["accuracy"], metrics[METRIC], abs_tol=TOLERANCE):
        raise PublishError(f"metrics.json accuracy {metrics[METRIC]} differs from the evaluation's "
                           f"{evaluation['accuracy']}; re-run evaluate for this run")


def _version_for(model_root: str, run_id: str, model_sha256: str) -> tuple[str, bool]:
    """(version id, complete?) for this run's model: the existing one if published before, else a new id.

    An incomplete earlier attempt is deleted, so the upload starts from nothing.
    """
    run_hash = hashlib.sha256(f"{run_id}\n{model_sha256}".encode()).hexdigest()[:RUN_HASH_CHARS]
    for version, files in registry.version_files(model_root).items():
        if version.endswith(f"-{run_hash}"):
            if CHECKSUMS in files:
                return version, True
            log.info("publish: deleting incomplete earlier upload of %s", version)
            storage.delete(registry.version_uri_of(model_root, version) + "/")
            return version, False
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{run_hash}", False


def _checked_stage(cfg: RunConfig, stage: Path, metrics: dict, golden: Path, test_records: Path,
                   version_uri: str) -> tuple[dict, np.ndarray | None]:
    """Add what the run root does not hold: the SavedModel export, the run's params, the TFLite variants, and
    the serving check's and TFLite's results in metrics.json. The serving check must pass. Returns metrics.json
    and the float32 TFLite variant's probabilities for the test split (None when not convertible)."""
    model = classifier.load(stage / MODEL_DIR, cfg.cache_dir).model
    serving_export.export(model, classifier.read_spec(stage / MODEL_DIR).classes, stage / SAVED_MODEL_DIR)
    # the serving check's fresh process (mostly one core's imports and loads) runs beside the rest
    with serving_check.started(stage / MODEL_DIR, stage / SAVED_MODEL_DIR, golden, test_records,
                               version_uri) as serving_checked:
        embedding_reference.publish(cfg, model, stage)  # reference/: training embeddings for batch scoring's shift
        (stage / PARAMS_FILE).write_text(json.dumps(cfg.to_public_dict(), indent=2, sort_keys=True) + "\n")
        variants, float32 = tflite_export.export_variants(stage / SAVED_MODEL_DIR, test_records,
                                                          float(metrics[METRIC]), stage / TFLITE_DIR)
        checked = serving_checked()
    metrics = {**metrics, "serving_check": checked, "tflite": variants}
    (stage / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics, float32


def _evaluated_answers(cfg: RunConfig, evaluation: dict | None, float32: np.ndarray | None, test_records: Path,
                       classes: list[str]) -> dict[str, str]:
    """The candidate's answers on its test split (image sha256 -> class name) from the predictions evaluate handed
    over, when the model being published is shown to give them: its float32 TFLite variant, converted in this step
    from the SavedModel being published and run on every test image, lands within the serving check's tolerance
    of every evaluated probability. Otherwise {}: the judge scores the SavedModel on every image itself.

    The handed-over file is input, never authority: it only spares the judge a pass of the SavedModel over the
    test split when it agrees, image by image, with answers computed here."""
    if float32 is None:
        return _not_reused("the SavedModel has no float32 TFLite variant to check them against")
    if not evaluation or "predictions_uri" not in evaluation:
        return _not_reused("evaluate handed over none")
    uri = artifacts.arrived(cfg, evaluation["predictions_uri"], artifacts.EVALUATED_PREDICTIONS)
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as stored:
            paths, evaluated = [str(path) for path in stored["paths"]], np.asarray(stored["probabilities"], float)
    except (KeyError, ValueError, OSError) as error:
        return _not_reused(f"{uri} cannot be read ({type(error).__name__}: {error})")
    images = [(hashlib.sha256(image).hexdigest(), path) for image, _, path in iter_records(test_records)]
    if [path for _, path in images] != paths or evaluated.shape != float32.shape:
        return _not_reused(f"{uri} is not for this test split ({len(paths)} rows, {len(images)} records)")
    difference = float(np.max(np.abs(evaluated - float32)))
    if not difference <= serving_check.TOLERANCE:
        return _not_reused(f"the float32 TFLite variant answers up to {difference:.3g} away from them (tolerance "
                           f"{serving_check.TOLERANCE:g})")
    answers: dict[str, str] = {}
    for (digest, _), predicted in zip(images, evaluated.argmax(axis=1), strict=True):
        answers.setdefault(digest, classes[int(predicted)])  # an image stored twice keeps its first answer
    log.info("publish: the candidate's answers on its %d test images are evaluate's (the float32 TFLite variant "
             "of the SavedModel being published answers them within %.2g of them)", len(images), difference)
    return answers


def _not_reused(reason: str) -> dict:
    log.info("publish: judging the candidate through its SavedModel on every image, not by evaluate's predictions: "
             "%s", reason)
    return {}


def _finish_stage(model_name: str, stage: Path, metrics: dict, judged: dict, predictions: dict[str, str],
                  test_records: Path) -> None:
    """The release and promotion sections in the model card and release page, the per-image predictions and the
    test split (a later candidate is judged on it too)."""
    release = model_card.release_section(metrics) + "\n\n" + promotion.card_section(judged)
    with (stage / MODEL_CARD_FILE).open("a", encoding="utf-8") as card:
        card.write("\n\n" + release + "\n")
    report.write_release_page(stage / REPORT_DIR, model_name, release)
    (stage / PREDICTIONS_FILE).write_text(promotion.predictions_document(predictions, judged["judged_on"]))
    (stage / TEST_RECORDS).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(test_records, stage / TEST_RECORDS)


def _upload_verified(stage: Path, version_uri: str) -> None:
    """Hash, upload, read everything back, and only then write checksums.json: the mark of a complete version."""
    checksums = {path.relative_to(stage).as_posix(): storage.sha256_file(path)
                 for path in sorted(stage.rglob("*")) if path.is_file()}
    storage.upload(stage, version_uri)
    registry.verify_version(version_uri, checksums)
    storage.write_json(storage.join(version_uri, CHECKSUMS), checksums)
    log.info("publish: uploaded and verified %d files (%.1f MB) to %s", len(checksums),
             sum(path.stat().st_size for path in stage.rglob("*") if path.is_file()) / 1e6, version_uri)


