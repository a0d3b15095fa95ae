"""The artifact catalog: every file a run keeps under its run root, named once with the step that writes it.

Steps hand each other these artifacts through the run root (never through
XCom, which carries only their URIs and small results). A step that needs an
upstream artifact asks `require`, which fails with "run <producer> first"
naming the artifact, so a task run out of order says what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks import storage
from tasks.errors import MissingInputError

if TYPE_CHECKING:
    from tasks.config import RunConfig


@dataclass(frozen=True)
class Artifact:
    """One run-root artifact: where it lives, which step writes it, what it is."""

    parts: tuple[str, ...]
    producer: str
    what: str
    per_candidate: bool = False  # lives under candidates/<slug>/: one per candidate backbone

    @property
    def path(self) -> str:
        """The path below the run root, e.g. "data/manifest.json"."""
        return "/".join(self.parts)


ACQUIRED = Artifact(("data", "acquired.json"), "acquire",
                    "the acquired dataset: where it is, its classes and every image per split and class")
MANIFEST = Artifact(("data", "manifest.json"), "subsample",
                    "the selection: every file, label and split, seed, skipped files, one content hash")
CHANGES = Artifact(("data", "changes.json"), "check_changes",
                   "what changed since the champion: fingerprints, files per class, class-prior and embedding shift")
FEATURES = Artifact(("features",), "train", "cached backbone features of the train and val splits",
                    per_candidate=True)
CHECKPOINTS = Artifact(("checkpoints",), "train", "per-epoch training state of each phase", per_candidate=True)
ACTIVATIONS = Artifact(("activations",), "fine_tune", "frozen-bottom activations per cut, computed once per image",
                       per_candidate=True)
TENSORBOARD = Artifact(("tensorboard",), "train", "TensorBoard scalars of each phase", per_candidate=True)
HISTORY = Artifact(("train", "history.json"), "train", "per-epoch metrics of both phases", per_candidate=True)
TRAIN_SUMMARY = Artifact(("train", "summary.json"), "train", "backbone, phases, and which model was kept",
                         per_candidate=True)
DECISION = Artifact(("train", "decision.json"), "decide", "whether to fine-tune, and why", per_candidate=True)
FEATURE_EXTRACTION_MODEL = Artifact(("model", "feature_extraction"), "train",
                                    "the classifier after feature extraction (tasks.classifier folder)",
                                    per_candidate=True)
FINE_TUNED_MODEL = Artifact(("model", "fine_tuned"), "fine_tune", "the classifier after fine-tuning",
                            per_candidate=True)
MODEL = Artifact(("model", "kept"), "train",
                 "the run's classifier: the better of the two phases on validation (fine_tune may replace it)",
                 per_candidate=True)
TRAINING_ERROR = Artifact(("train", "error.json"), "train", "why this candidate's training failed",
                          per_candidate=True)
LEADERBOARD = Artifact(("leaderboard.json",), "select", "every candidate ranked on validation accuracy, with errors")
METRICS = Artifact(("eval", "metrics.json"), "evaluate", "test-split metrics")
REPORT = Artifact(("eval", "report"), "evaluate", "the HTML report with curves, confusion matrix, gallery")
MODEL_CARD = Artifact(("eval", "model_card.md"), "evaluate", "the model card")
GOLDEN = Artifact(("golden", "batch.npz"), "evaluate",
                  "the golden batch: the first test images' paths and the evaluated model's probabilities for them, "
                  "which the published artifacts must reproduce")
PUBLISHED = Artifact(("publish.json",), "publish", "the published version and the promotion decision")


def split_records(split: str) -> Artifact:
    """The TFRecord file of one split ("train", "val" or "test")."""
    return Artifact(("data", f"{split}.tfrecord"), "subsample", f"the {split} split's encoded images and labels")


def require(cfg: RunConfig, *artifacts: Artifact) -> list[str]:
    """The URIs of artifacts a step reads; MissingInputError naming each that is missing and its producer."""
    uris = [cfg.artifact(artifact) for artifact in artifacts]
    missing = [f"{artifact.path} (at {uri}; run {artifact.producer} first)"
               for artifact, uri in zip(artifacts, uris) if not storage.exists(uri)]
    if missing:
        raise MissingInputError(f"run {cfg.run_id!r} lacks {'; '.join(missing)}")
    return uris
