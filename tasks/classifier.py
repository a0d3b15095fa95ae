"""The run's image classifier as files: a spec to rebuild it and the weights to load into it.

A saved classifier is a folder with `classifier.json` (backbone spec, image
size, classes, dropout) and `model.weights.h5`. Loading rebuilds the model from
the spec with the project's own code and loads the weights: nothing in the
files is deserialised as code, so every backbone kind reloads with Keras safe
mode on — including TF Hub and SavedModel backbones, whose `TFSMLayer` Keras
refuses to deserialise from a `.keras` file. The backbone is rebuilt without
its pretrained weights (they are overwritten anyway), so a worker without
network access or the first worker's cache can load a keras.applications or
Lite0 classifier; a Hub/SavedModel backbone is fetched into that worker's cache.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras

from tasks import storage
from tasks.backbones import Backbone, carries_own_weights, load_backbone
from tasks.errors import TrainingError
from tasks.head import build_head, compose

SPEC_FILE = "classifier.json"
WEIGHTS_FILE = "model.weights.h5"


@dataclass(frozen=True)
class ClassifierSpec:
    """What rebuilds a classifier: the same spec always builds the same layers, so saved weights fit."""

    backbone: str
    image_size: int
    classes: tuple[str, ...]
    dropout: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}


@dataclass
class Classifier:
    """A built classifier and its parts: the model shares the backbone's and head's layers."""

    spec: ClassifierSpec
    backbone: Backbone
    head: keras.Model
    model: keras.Model


def build(spec: ClassifierSpec, weights: str, cache_dir: str) -> Classifier:
    """Backbone (`weights`: "imagenet", "none" or a file) + a new head: raw pixels in, probabilities out."""
    backbone = load_backbone(spec.backbone, spec.image_size, weights, cache_dir)
    head = build_head(tuple(backbone.model.output_shape[1:]), len(spec.classes), spec.dropout)
    return Classifier(spec, backbone, head, compose(backbone, head))


def save(classifier: Classifier, directory: Path) -> Path:
    """Write the spec and the weights of the composed model into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    classifier.model.save_weights(directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(classifier.spec.to_json(), indent=2))
    return directory


def upload(classifier: Classifier, scratch: Path, *uris: str) -> None:
    """Save once into scratch and upload the folder to each URI (a run-root model artifact)."""
    local = save(classifier, scratch / "classifier")
    for uri in uris:
        storage.delete(uri.rstrip("/") + "/")
        storage.upload(local, uri)


def read_spec(directory: Path) -> ClassifierSpec:
    """The spec of a saved classifier; TrainingError naming the folder when it is not one."""
    path = directory / SPEC_FILE
    try:
        values = json.loads(path.read_text())
        return ClassifierSpec(backbone=str(values["backbone"]), image_size=int(values["image_size"]),
                              classes=tuple(str(name) for name in values["classes"]),
                              dropout=float(values["dropout"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"{directory} is not a saved classifier ({error}); it needs {SPEC_FILE} and "
                            f"{WEIGHTS_FILE}: re-run the step that wrote it") from error


def load(directory: Path, cache_dir: str) -> Classifier:
    """Rebuild the classifier saved in `directory` and load its weights (no code is deserialised)."""
    spec = read_spec(directory)
    classifier = build(spec, "imagenet" if carries_own_weights(spec.backbone) else "none", cache_dir)
    try:
        classifier.model.load_weights(directory / WEIGHTS_FILE)
    except (OSError, ValueError) as error:
        raise TrainingError(f"{directory / WEIGHTS_FILE} does not fit the classifier its {SPEC_FILE} describes "
                            f"({error}); re-run the step that wrote it") from error
    return classifier


def fetch(uri: str, scratch: Path, cache_dir: str) -> Classifier:
    """Download a saved classifier folder (local or s3://) and load it."""
    return load(storage.download(uri.rstrip("/") + "/", scratch / "fetched-classifier"), cache_dir)
