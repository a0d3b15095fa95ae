"""The artifact catalog: every file a run keeps under its run root, named once with the step that writes it
and the steps that read it.

Big things stay under the run root; the DAG's edges (XCom) carry their URIs.
A consumer gets an artifact one of two ways, and the catalog says which:
- on its DAG edge (`consumers`): the producer returns the URI and the consumer
  takes it from there, checked by `arrived` to be where this run keeps that
  artifact (an XCom value is input, never a location of its own choosing);
- through the run root (`read_through_run_root`): the consumer asks `require`
  for it, e.g. select reading every candidate's summary, which a failed train
  task never returned.
Either way a missing input fails with "run <producer> first". Each artifact has
one writer: no step rewrites what another wrote.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks import storage
from tasks.errors import MissingInputError
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE

if TYPE_CHECKING:
    from tasks.config import RunConfig

REPORT_PAGE = "index.html"  # the page of the REPORT folder


@dataclass(frozen=True)
class Artifact:
    """One run-root artifact: where it lives, which step writes it, which steps read it and how, what it is."""

    parts: tuple[str, ...]
    producer: str
    what: str
    consumers: tuple[str, ...] = ()  # steps that get its URI on their DAG edge
    read_through_run_root: tuple[str, ...] = ()  # steps that find it under the run root (`require`)
    per_candidate: bool = False  # lives under candidates/<slug>/: one per candidate backbone

    @property
    def path(self) -> str:
        """The path below the run root, e.g. "data/manifest.json"."""
        return "/".join(self.parts)


ACQUIRED = Artifact(("data", "acquired.json"), "acquire",
                    "the acquired dataset: where it is, its classes and every image per split and class",
                    consumers=("subsample",), read_through_run_root=("subsample",))
MANIFEST = Artifact(("data", "manifest.json"), "subsample",
                    "the selection: every file, label and split, seed, skipped files, one content hash",
                    consumers=("check_changes", "train", "decide", "fine_tune", "evaluate"),
                    read_through_run_root=("publish_version", "candidates", "select"))  # image_size auto's sizes
CHANGES = Artifact(("data", "changes.json"), "check_changes",
                   "what changed since the champion: fingerprints, files per class, class-prior and embedding shift",
                   read_through_run_root=("evaluate", "approve", "promote"))
FEATURES = Artifact(("features",), "train", "cached backbone features of the train and val splits",
                    per_candidate=True)
ACTIVATIONS = Artifact(("activations",), "fine_tune", "frozen-bottom activations per cut, computed once per image",
                       per_candidate=True)
BOUNDARY = Artifact(("train", "boundary"), "train", "fine-tuning's boundary activations of the train and val splits, "
                    "left by feature extraction's pass when it ran every image through the backbone",
                    consumers=("fine_tune",), read_through_run_root=("select",), per_candidate=True)
HISTORY = Artifact(("train", "history.json"), "train", "per-epoch metrics of feature extraction",
                   consumers=("decide", "fine_tune", "evaluate"), per_candidate=True)
TRAIN_SUMMARY = Artifact(("train", "summary.json"), "train", "feature extraction's backbone, epochs and best score",
                         consumers=("fine_tune", "evaluate"), read_through_run_root=("select",), per_candidate=True)
TRAINING_ERROR = Artifact(("train", "error.json"), "train", "why this candidate's training failed",
                          read_through_run_root=("select",), per_candidate=True)
FEATURE_EXTRACTION_MODEL = Artifact(("model", "feature_extraction"), "train",
                                    "the classifier after feature extraction (tasks.classifier folder)",
                                    consumers=("fine_tune", "evaluate"), read_through_run_root=("publish_version",),
                                    per_candidate=True)
LEADERBOARD = Artifact(("leaderboard.json",), "select", "every candidate ranked on validation accuracy, with errors",
                       consumers=("evaluate",))
DECISION = Artifact(("train", "decision.json"), "decide", "whether to fine-tune, and why",
                    read_through_run_root=("evaluate",), per_candidate=True)
FINE_TUNE_HISTORY = Artifact(("fine_tune", "history.json"), "fine_tune", "per-epoch metrics of fine-tuning",
                             consumers=("evaluate",), per_candidate=True)
FINE_TUNE_SUMMARY = Artifact(("fine_tune", "summary.json"), "fine_tune", "fine-tuning's cut, epochs and best score",
                             consumers=("evaluate",), per_candidate=True)
FINE_TUNED_MODEL = Artifact(("model", "fine_tuned"), "fine_tune", "the classifier after fine-tuning",
                            consumers=("evaluate",), read_through_run_root=("publish_version",), per_candidate=True)
METRICS = Artifact(("eval", "metrics.json"), "evaluate", "test-split metrics, and which phase's model was scored",
                   read_through_run_root=("publish_version",))
REPORT = Artifact(("eval", "report"), "evaluate", f"the HTML report ({REPORT_PAGE}) with curves, confusion matrix, "
                  "gallery", read_through_run_root=("publish_version",))
MODEL_CARD = Artifact(("eval", "model_card.md"), "evaluate", "the model card",
                      read_through_run_root=("publish_version",))
GOLDEN = Artifact(("golden", "batch.npz"), "evaluate",
                  "the golden batch: the first test images' paths and the evaluated model's probabilities for them, "
                  "which the published artifacts must reproduce", read_through_run_root=("publish_version",))
EVALUATED_PREDICTIONS = Artifact(("eval", "predictions.npz"), "evaluate",
                                 "every test image's path and the evaluated model's probabilities: publish reuses them "
                                 "for the judgement once the published model's TFLite answers match them",
                                 consumers=("publish_version",))
JUDGEMENT = Artifact(("judgement.json",), "publish_version",
                     "the published version and whether the rule would promote it (also kept in the registry)")
PUBLISHED = Artifact(("publish.json",), "promote", "the published version and the promotion decision")
# batch_predict runs (tasks/batch_config.py): the listing and each shard's record stay in the run root; the
# predictions themselves go to the run's predictions location, keyed by content (tasks/batch_scoring.py)
BATCH_LISTING = Artifact(("predictions", "listing.json"), "list_images",
                         "the images to score (relative paths below the source) and the shards they fall into",
                         read_through_run_root=("score_shard", "merge_predictions"))
BATCH_SHARD = Artifact(("predictions", "shards"), "score_shard",
                       "one record per shard: its content key and counts, naming where its predictions are",
                       read_through_run_root=("merge_predictions",))
BATCH_SUMMARY = Artifact(("predictions", "summary.json"), "merge_predictions",
                         "counts per class, confidence histogram, unreadable files, shift against the test set")
BATCH_GALLERY = Artifact(("predictions", "gallery.html"), "merge_predictions",
                         "the least confident predictions with thumbnails, served by plugins/ml_predictions.py")

PHASE_STEPS = {FEATURE_EXTRACTION: "train", FINE_TUNE: "fine_tune"}
MODELS = {FEATURE_EXTRACTION: FEATURE_EXTRACTION_MODEL, FINE_TUNE: FINE_TUNED_MODEL}  # each phase's model


def checkpoints(phase: str) -> Artifact:
    """Per-epoch training state of one phase (tasks.checkpoints), read back only by a retry of its own step."""
    return Artifact(("checkpoints", phase), PHASE_STEPS[phase], f"per-epoch training state of {phase}",
                    per_candidate=True)


def tensorboard(phase: str) -> Artifact:
    """TensorBoard scalars of one phase."""
    return Artifact(("tensorboard", phase), PHASE_STEPS[phase], f"TensorBoard scalars of {phase}",
                    per_candidate=True)


def split_records(split: str) -> Artifact:
    """The TFRecord file of one split ("train", "val" or "test")."""
    readers = {"train": ("check_changes", "train", "fine_tune", "publish_version"),
               "val": ("check_changes", "train", "fine_tune", "evaluate"),
               "test": ("evaluate", "publish_version")}[split]
    return Artifact(("data", f"{split}.tfrecord"), "subsample", f"the {split} split's encoded images and labels",
                    read_through_run_root=readers)


def catalog() -> list[Artifact]:
    """Every artifact a run can hold."""
    fixed = [value for value in globals().values() if isinstance(value, Artifact)]
    return fixed + [make(phase) for make in (checkpoints, tensorboard) for phase in PHASE_STEPS] + [
        split_records(split) for split in ("train", "val", "test")]


def require(cfg: RunConfig, *artifacts: Artifact) -> list[str]:
    """The URIs of artifacts a step reads through the run root; MissingInputError naming each that is missing
    and its producer."""
    uris = [cfg.artifact(artifact) for artifact in artifacts]
    missing = [f"{artifact.path} (at {uri}; run {artifact.producer} first)"
               for artifact, uri in zip(artifacts, uris, strict=True) if not storage.exists(uri)]
    if missing:
        raise MissingInputError(f"run {cfg.run_id!r} lacks {'; '.join(missing)}")
    return uris


def arrived(cfg: RunConfig, uri: object, *expected: Artifact) -> str:
    """A URI handed over on a DAG edge, checked to be where this run keeps one of `expected`, and to exist.

    The edge says which artifact flows; the run's own catalog says where it may
    be, so an edited XCom value cannot point a step at another run's or another
    place's files.
    """
    places = {cfg.artifact(artifact).rstrip("/"): artifact for artifact in expected}
    names = " or ".join(artifact.path for artifact in expected)
    if not isinstance(uri, str) or uri.rstrip("/") not in places:
        raise MissingInputError(f"run {cfg.run_id!r} was handed {uri!r} as its {names}, which is not where this run "
                                f"keeps it ({', '.join(places)}); re-run {expected[0].producer} and the steps after it")
    artifact = places[uri.rstrip("/")]
    if not storage.exists(uri):
        raise MissingInputError(f"run {cfg.run_id!r} lacks {artifact.path} (at {uri}; run {artifact.producer} first)")
    return uri


def read_manifest(cfg: RunConfig, data: dict) -> dict:
    """The manifest subsample handed over (`data`, its result), plus the file's sha256: checkpoints and caches
    hold only for it.

    A manifest whose selection hash differs from the one subsample returned was
    rewritten since (another subsample of this run): every step refuses it.
    """
    uri = arrived(cfg, data.get("manifest"), MANIFEST)
    raw = storage.read_bytes(uri)
    manifest = json.loads(raw)
    if data.get("hash") != manifest.get("hash"):
        raise MissingInputError(f"{uri} holds selection {manifest.get('hash')!r}, but subsample handed over "
                                f"{data.get('hash')!r}; re-run subsample and the steps after it for run {cfg.run_id!r}")
    if not manifest.get("classes"):
        raise MissingInputError(f"{uri} lists no classes; rerun subsample with at least two classes")
    return {**manifest, "sha256": hashlib.sha256(raw).hexdigest()}
