"""Per-epoch checkpoints and the resumable fit loop shared by feature extraction and fine-tuning.

A training task can die at any point (OOM, a lost Celery worker, a retry on
another machine). After every epoch the complete training state goes under the
run root: every model variable (weights, and the dropout/augmentation RNG
state), the optimizer's variables (Adam's step count and moments), the
early-stopping counters with the best weights so far, and the history. A rerun
of the step restores all of it and continues with the next epoch, and since the
data order of each epoch is keyed by the epoch number, the resumed history is
the one an uninterrupted run would have produced.

Layout of `<run root>/checkpoints/<phase>/`: `epoch-NNNN.npz` (the arrays) and
`state.json` (epoch, history, early-stopping state, which npz), written last in
one PUT, so a kill between the two leaves the previous checkpoint intact.
"""
from __future__ import annotations

import functools
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import keras
import numpy as np

from tasks import storage
from tasks.errors import CheckpointError, StorageError

log = logging.getLogger(__name__)

STATE = "state.json"
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on val_accuracy whose counters survive a restart; it keeps the best epoch's weights.

    Two rules, kept apart on purpose. Stopping: training ends after `patience`
    epochs without a gain of more than `min_delta` over the reference (the last
    epoch that made such a gain), as in Keras. Keeping: the weights restored at
    the end are those of the highest val_accuracy seen, the later epoch on a tie.
    Keras uses its min_delta reference for both, so it keeps the first epoch that
    cleared it and drops later ones that only gained less than min_delta: with
    fine-tuning's cosine decay that threw away the settled end of the schedule (on
    Fashion-MNIST it kept epoch 14 of 17, val 0.912 -> test 0.902, over epoch 17's
    val 0.917 -> test 0.916).
    """

    def __init__(self, patience: int, min_delta: float):
        super().__init__(monitor="val_accuracy", mode="max", patience=patience, min_delta=min_delta,
                         restore_best_weights=True)
        self.reference: float | None = None  # the val_accuracy the patience counts from
        self._resumed: tuple[dict[str, Any], list[np.ndarray] | None] | None = None

    def state(self) -> dict[str, Any]:
        """The counters a restart needs (JSON-able); best_weights travel in the npz."""
        return {"wait": self.wait, "best": None if self.best is None else float(self.best),
                "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch, "reference": self.reference}

    def resume(self, state: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
        """Continue from a checkpoint; applied when fit() starts (Keras resets the counters there)."""
        self._resumed = (state, best_weights)
        self.on_train_begin()

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)  # wait, stopped_epoch, best and best_weights start over
        self.reference = None
        if self._resumed is not None:
            state, self.best_weights = self._resumed
            self.wait, self.best = state["wait"], state["best"]
            self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
            self.reference = state.get("reference", self.best)  # a checkpoint from before the two rules

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        current = self.get_monitor_value(logs)
        if current is None:
            return
        current = float(current)
        self.wait += 1
        if self.reference is None or current - self.min_delta > self.reference:  # Keras' own test
            self.reference, self.wait = current, 0
        if self.best is None or current >= self.best:
            self.best, self.best_epoch, self.best_weights = current, epoch, self.model.get_weights()
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True


@dataclass
class Resume:
    """What a restored checkpoint says about the phase so far."""

    epoch: int  # epochs completed, counted across phases: the next fit's initial_epoch
    history: list[dict[str, Any]]


class Checkpointer:
    """Saves and restores the training state of one phase under `uri` (local or s3://)."""

    def __init__(self, uri: str, scratch: Path, fingerprint: dict[str, Any]):
        self.uri = uri
        self.scratch = scratch
        self.fingerprint = fingerprint
        scratch.mkdir(parents=True, exist_ok=True)

    def save(self, epoch: int, history: list[dict[str, Any]], model: keras.Model,
             early_stopping: ResumableEarlyStopping) -> None:
        """Checkpoint after `epoch` completed epochs; the npz first, then state.json, then old npz files go."""
        name = f"epoch-{epoch:04d}.npz"
        local = self.scratch / name
        arrays = {f"model_{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
        arrays |= {f"optimizer_{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)}
        arrays |= {f"best_{i}": w for i, w in enumerate(early_stopping.best_weights or [])}
        np.savez(local, **arrays)
        storage.upload(local, storage.join(self.uri, name))
        local.unlink()
        storage.write_json(storage.join(self.uri, STATE), {
            "epoch": epoch, "weights": name, "history": history,
            "early_stopping": early_stopping.state(), "fingerprint": self.fingerprint,
        })
        for old in storage.list_files(self.uri):
            if old.endswith(".npz") and not old.endswith(name):
                storage.delete(old)

    def restore(self, model: keras.Model, early_stopping: ResumableEarlyStopping) -> Resume | None:
        """Load the last checkpoint into `model` (compiled), its optimizer and `early_stopping`.

        None when there is no checkpoint, or one made with other settings or data
        (then the phase starts over and overwrites it).
        """
        state_uri = storage.join(self.uri, STATE)
        if not storage.exists(state_uri):
            return None
        try:
            state = storage.read_json(state_uri)
            if state.get("fingerprint") != self.fingerprint:
                log.warning("checkpoint %s was made with other settings or data; starting this phase over", self.uri)
                return None
            weights_uri = storage.join(self.uri, state["weights"])
            with np.load(storage.download(weights_uri, self.scratch / state["weights"])) as stored:
                arrays = {key: stored[key] for key in stored.files}
        except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile, StorageError) as error:
            log.warning("checkpoint %s is corrupt (%s: %s); deleting it and starting this phase over", self.uri,
                        type(error).__name__, error)
            storage.delete(self.uri.rstrip("/") + "/")
            return None
        model.optimizer.build(model.trainable_variables)
        _assign(weights_uri, "model", model.variables, arrays)
        _assign(weights_uri, "optimizer", model.optimizer.variables, arrays)
        best = [arrays[f"best_{i}"] for i in range(sum(key.startswith("best_") for key in arrays))]
        early_stopping.resume(state["early_stopping"], best or None)
        return Resume(epoch=state["epoch"], history=state["history"])


def _assign(uri: str, group: str, variables: list, arrays: dict[str, np.ndarray]) -> None:
    stored = sum(key.startswith(f"{group}_") for key in arrays)
    shapes = [tuple(v.shape) for v in variables]
    if stored != len(variables) or any(arrays[f"{group}_{i}"].shape != s for i, s in enumerate(shapes)):
        raise CheckpointError(f"{uri}: its {group} state ({stored} arrays) does not fit this model "
                              f"({len(variables)} variables); delete the checkpoint folder to start the phase over")
    for i, variable in enumerate(variables):
        variable.assign(arrays[f"{group}_{i}"])


class EpochEnd(keras.callbacks.Callback):
    """Per epoch, after EarlyStopping has seen it: a log line, a history entry, TensorBoard scalars, a checkpoint.

    The scalars are written with TensorFlow's own summary writer (the
    `tensorboard` package, which keras.callbacks.TensorBoard needs, is not a
    dependency) in Keras' layout: `train/` and `validation/`, tags `epoch_loss`
    and `epoch_accuracy`, step = the 1-based epoch of history.json.
    """

    def __init__(self, phase: str, last_epoch: int, history: list[dict[str, Any]], checkpointer: Checkpointer,
                 early_stopping: ResumableEarlyStopping, tensorboard: tuple[Path, str]):
        super().__init__()
        self.phase, self.last_epoch, self.history = phase, last_epoch, history
        self.checkpointer, self.early_stopping = checkpointer, early_stopping
        self.tensorboard_dir, self.tensorboard_uri = tensorboard
        self._writers: dict[str, Any] = {}
        self._started = time.monotonic()

    def on_train_begin(self, logs=None) -> None:
        import tensorflow as tf

        self._writers = {prefix: tf.summary.create_file_writer(str(self.tensorboard_dir / folder))
                         for prefix, folder in (("", "train"), ("val_", "validation"))}

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        entry = {"epoch": epoch + 1, "phase": self.phase, **{key: float(logs[key]) for key in METRICS}}
        self.history.append(entry)
        log.info("%s epoch %d/%d %s (%.1f s)", self.phase, epoch + 1, self.last_epoch,
                 " ".join(f"{key}={entry[key]:.4f}" for key in METRICS), time.monotonic() - self._started)
        self._write_scalars(entry)
        self.checkpointer.save(epoch + 1, self.history, self.model, self.early_stopping)

    def on_train_end(self, logs=None) -> None:
        for writer in self._writers.values():
            writer.close()

    def _write_scalars(self, entry: dict[str, Any]) -> None:
        import tensorflow as tf

        for prefix, writer in self._writers.items():
            with writer.as_default():
                for name in ("loss", "accuracy"):
                    tf.summary.write(f"epoch_{name}", tf.constant(entry[prefix + name], tf.float32),
                                     step=entry["epoch"], metadata=_scalar_metadata())
            writer.flush()
        storage.upload(self.tensorboard_dir, self.tensorboard_uri)


def _scalar_metadata():
    """What marks a summary as a scalar for TensorBoard's scalars dashboard."""
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                                       data_class=summary_pb2.DATA_CLASS_SCALAR)


@dataclass
class FitResult:
    """One phase's outcome; the model holds the best epoch's weights."""

    history: list[dict[str, Any]]  # this phase's epochs, numbered across phases from 1
    resumed_from_epoch: int | None  # the first epoch this call ran after a restore, else None
    best_epoch: int  # the epoch whose weights the model holds: the highest val_accuracy, the later on a tie
    best_val_accuracy: float
    stopped_early: bool

    def record(self, seconds: float) -> dict[str, Any]:
        """The phase's numbers in its summary (tasks.phases.PhaseSummary)."""
        return {"epochs": len(self.history), "seconds": seconds, "best_epoch": self.best_epoch,
                "best_val_accuracy": self.best_val_accuracy, "stopped_early": self.stopped_early,
                "resumed_from_epoch": self.resumed_from_epoch}

    def describe(self) -> str:
        """For the step's one log line: "10 epochs (resumed at epoch 4), kept epoch 8 (val_accuracy 0.8600)"."""
        resumed = f" (resumed at epoch {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        return (f"{len(self.history)} epochs{resumed}, kept epoch {self.best_epoch} "
                f"(val_accuracy {self.best_val_accuracy:.4f})")


@dataclass(frozen=True)
class Stopping:
    """Early stopping on val_accuracy: stop after `patience` epochs that gained less than `min_delta`."""

    patience: int
    min_delta: float


class Epochs(Protocol):
    """How a phase's epochs run: KerasEpochs below, or a head's on cached features (tasks/head_training.py)."""

    def run(self, model: keras.Model, first: int, last: int, callbacks: list[keras.callbacks.Callback]) -> None:
        """Train `model` (compiled) for epochs [first, last), calling `callbacks` as Keras' fit does; stop early
        when one sets model.stop_training."""


@dataclass(frozen=True)
class KerasEpochs:
    """Epochs through Keras' fit: `train_epoch(epoch)` gives that epoch's training batches (a tf.data.Dataset whose
    order depends only on the epoch number), `validation` the validation batches."""

    train_epoch: Callable[[int], Any]
    steps_per_epoch: int
    validation: Any

    def run(self, model: keras.Model, first: int, last: int, callbacks: list[keras.callbacks.Callback]) -> None:
        """The epochs still to run, concatenated into one stream that fit reads `steps_per_epoch` batches at a time."""
        stream = functools.reduce(lambda epochs, epoch: epochs.concatenate(self.train_epoch(epoch)),
                                  range(first + 1, last), self.train_epoch(first))
        model.fit(stream, epochs=last, initial_epoch=first, steps_per_epoch=self.steps_per_epoch,
                  validation_data=self.validation, callbacks=callbacks, shuffle=False, verbose=0)


def fit_resumable(model: keras.Model, *, phase: str, first_epoch: int, last_epoch: int, epochs: Epochs,
                  stopping: Stopping, fingerprint: dict[str, Any], checkpoint_uri: str, tensorboard_uri: str,
                  scratch: Path) -> FitResult:
    """Train `model` (compiled) for epochs [first_epoch, last_epoch) or until early stopping, resuming if possible.

    Checkpoints go to `checkpoint_uri`, TensorBoard scalars to `tensorboard_uri`.
    """
    checkpointer = Checkpointer(checkpoint_uri, scratch / "checkpoint", fingerprint)
    early_stopping = ResumableEarlyStopping(stopping.patience, stopping.min_delta)
    resume = checkpointer.restore(model, early_stopping)
    start, history = (resume.epoch, resume.history) if resume else (first_epoch, [])
    finished = start >= last_epoch or early_stopping.stopped_epoch > 0
    if resume is None:
        storage.delete(tensorboard_uri)
    elif not finished:
        log.info("%s: resuming after epoch %d from %s", phase, start, checkpointer.uri)
    if finished:
        model.set_weights(early_stopping.best_weights)
    else:
        tensorboard = (scratch / "tensorboard", tensorboard_uri)
        epochs.run(model, start, last_epoch,
                   [early_stopping, EpochEnd(phase, last_epoch, history, checkpointer, early_stopping, tensorboard)])
    return FitResult(history=history, resumed_from_epoch=start + 1 if resume and not finished else None,
                     best_epoch=early_stopping.best_epoch + 1, best_val_accuracy=float(early_stopping.best),
                     stopped_early=early_stopping.stopped_epoch > 0)
