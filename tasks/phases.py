"""The two training phases: their names, and what each records (its summary.json and history.json).

Feature extraction (step train) and fine-tuning (step fine_tune) each write their
own summary and history; neither touches the other's. Which phase's model a run
keeps is evaluate's choice (`kept`): the better of the two on validation. Readers
(select, evaluate, the report and the model card) read the files through this
module only, so the schema is written here once. No TensorFlow here: the plateau
rule and the UI read these too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tasks import storage
from tasks.errors import TrainingError
from tasks.redact import redact_text

FEATURE_EXTRACTION = "feature_extraction"
FINE_TUNE = "fine_tune"
PHASES = (FEATURE_EXTRACTION, FINE_TUNE)
LABELS = {FEATURE_EXTRACTION: "feature extraction", FINE_TUNE: "fine-tune"}


@dataclass(frozen=True)
class PhaseSummary:
    """What one phase did: its backbone, its epochs and their best validation accuracy, its own settings."""

    phase: str
    backbone: str
    weights_source: str
    feature_dim: int
    manifest_hash: str
    epochs: int
    seconds: float
    best_epoch: int
    best_val_accuracy: float
    stopped_early: bool
    resumed_from_epoch: int | None
    settings: dict[str, Any] = field(default_factory=dict)  # augment; fine-tuning's rate, schedule, cut, layers

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any], uri: str) -> PhaseSummary:
        """The summary in `values` (read from `uri`); TrainingError naming the file when it is not one."""
        try:
            summary = cls(**values)
        except TypeError as error:
            raise TrainingError(f"{uri} is not a phase summary ({error}); re-run the step that wrote it") from error
        if summary.phase not in PHASES:
            raise TrainingError(f"{uri} names phase {summary.phase!r}, not one of {PHASES}; re-run the step that "
                                "wrote it")
        return summary


def write_summary(uri: str, summary: PhaseSummary) -> None:
    storage.write_json(uri, summary.to_json())


def read_summary(uri: str) -> PhaseSummary:
    return PhaseSummary.from_json(storage.read_json(uri), uri)


def write_history(uri: str, epochs: list[dict[str, Any]]) -> None:
    """One phase's epochs ({epoch, phase, loss, accuracy, val_loss, val_accuracy}, numbered across phases)."""
    storage.write_json(uri, {"epochs": epochs})


def read_history(uri: str) -> list[dict[str, Any]]:
    return list(storage.read_json(uri)["epochs"])


def write_failure(uri: str, error: Exception) -> None:
    """Why a phase failed, where select looks for it (redacted: a backbone spec may hold credentials)."""
    storage.write_json(uri, {"error": redact_text(f"{type(error).__name__}: {error}")})


def read_failure(uri: str) -> str:
    return str(storage.read_json(uri)["error"])


def curves(feature_extraction: list[dict[str, Any]], fine_tune: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Both phases' epochs as one curve for the report: {"epochs": [...], "fine_tune_start_epoch": n or None}."""
    tuned = fine_tune or []
    return {"epochs": feature_extraction + tuned, "fine_tune_start_epoch": tuned[0]["epoch"] if tuned else None}


def kept_phase(feature_extraction: PhaseSummary, fine_tune: PhaseSummary | None) -> str:
    """The phase whose model the run keeps: fine-tuning only when it beat feature extraction on validation."""
    if fine_tune is not None and fine_tune.best_val_accuracy > feature_extraction.best_val_accuracy:
        return FINE_TUNE
    return FEATURE_EXTRACTION
