"""The backbone registry: keras.applications, SavedModels/TF Hub, fine-tuning controls."""
from __future__ import annotations

import hashlib
import tarfile
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

from tasks import backbones, storage
from tasks.backbones import BackboneError, available_backbones, load_backbone, make_optimizer, set_trainable_top
from tests.helpers.backbones import SIZE, pixels
from tests.helpers.datasets import serve


@pytest.mark.parametrize("name, feature_dim", [("efficientnet_b0", 1280), ("resnet50_v2", 2048),
                                               ("mobilenet_v2", 1280)])
def test_keras_applications_give_pooled_features(name, feature_dim):
    backbone = load_backbone(name, SIZE, weights="none")
    assert backbone.feature_dim == feature_dim
    assert backbone.model(pixels(), training=False).shape == (2, feature_dim)
    assert "random" in backbone.weights_source


def test_application_preprocessing_is_inside_the_model():
    backbone = load_backbone("mobilenet_v2", SIZE, weights="none")
    base = backbone.model.get_layer(index=-1)
    images = pixels()
    expected = base(keras.applications.mobilenet_v2.preprocess_input(images.copy()), training=False)
    np.testing.assert_allclose(backbone.model(images, training=False), expected, atol=1e-5)


@pytest.fixture
def mobilenet_weights(tmp_path):
    """A weights file saved from a random MobileNetV2 base (include_top=False, as the registry builds it)."""
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3),
                                            pooling="avg")
    path = tmp_path / "mobilenet.weights.h5"
    source.save_weights(path)
    return source, path


def assert_same_weights(source: keras.Model, backbone) -> None:
    loaded = backbone.model.get_layer(index=-1).weights
    assert len(loaded) == len(source.weights)
    for expected, actual in zip(source.weights, loaded, strict=False):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())


def test_weights_file_from_local_path_loads_the_source_weights(mobilenet_weights):
    source, path = mobilenet_weights
    backbone = load_backbone("mobilenet_v2", SIZE, weights=str(path))
    assert_same_weights(source, backbone)
    assert str(path) in backbone.weights_source


def test_weights_file_from_s3_loads_the_source_weights(mobilenet_weights, s3_bucket):
    source, path = mobilenet_weights
    uri = f"{s3_bucket}/weights/mobilenet.weights.h5"
    storage.upload(path, uri)
    assert_same_weights(source, load_backbone("mobilenet_v2", SIZE, weights=uri))


def test_unknown_backbone_lists_available_ones():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg_99'") as error:
        load_backbone("vgg_99", SIZE)
    for name in available_backbones():
        assert name in str(error.value)
    assert {"efficientnet_lite0", "efficientnet_b0", "resnet50_v2", "mobilenet_v2"} <= set(available_backbones())


def test_unreadable_weights_file_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an hdf5 file")
    with pytest.raises(BackboneError, match="mobilenet_v2: cannot load weights .*garbage.weights.h5"):
        load_backbone("mobilenet_v2", SIZE, weights=str(garbage))
    with pytest.raises(BackboneError, match="efficientnet_lite0: cannot load weights"):
        load_backbone("efficientnet_lite0", SIZE, weights=str(garbage))
    with pytest.raises(BackboneError, match="missing.weights.h5.* cannot be read"):
        load_backbone("mobilenet_v2", SIZE, weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(BackboneError, match="unknown format"):
        load_backbone("mobilenet_v2", SIZE, weights=str(tmp_path / "weights.bin"))


# --- SavedModel / TF Hub ---------------------------------------------------------------------------

def assert_same_features(source: keras.Model, backbone) -> None:
    images = pixels()
    np.testing.assert_allclose(backbone.model(images, training=False), source(images / 255.0, training=False),
                               atol=1e-5)


def test_saved_model_directory_loads_as_backbone(saved_model):
    source, path = saved_model
    backbone = load_backbone(str(path), SIZE)
    assert backbone.feature_dim == 8
    assert "[0, 1]" in backbone.preprocessing
    assert_same_features(source, backbone)


def test_saved_model_from_s3_prefix_loads_as_backbone(saved_model, s3_bucket, tmp_path):
    source, path = saved_model
    uri = f"{s3_bucket}/models/tiny"
    storage.upload(path, uri)
    backbone = load_backbone(uri, SIZE, cache_dir=tmp_path / "cache")
    assert_same_features(source, backbone)
    again = load_backbone(uri + "/", SIZE, cache_dir=tmp_path / "cache")
    assert_same_features(source, again)


def test_s3_saved_model_cache_fetches_a_re_export_under_the_same_names(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/models/tiny"
    storage.write_bytes(f"{uri}/saved_model.pb", b"first export")
    storage.write_bytes(f"{uri}/variables/variables.data-00000-of-00001", b"weights v1")
    cache = tmp_path / "cache"
    first = backbones._cached_s3_prefix(uri, cache)
    assert (first / "variables" / "variables.data-00000-of-00001").read_bytes() == b"weights v1"
    assert backbones._cached_s3_prefix(uri, cache) == first

    storage.write_bytes(f"{uri}/variables/variables.data-00000-of-00001", b"weights v2")
    again = backbones._cached_s3_prefix(uri, cache)

    assert (again / "variables" / "variables.data-00000-of-00001").read_bytes() == b"weights v2"
    assert [p.name for p in cache.iterdir()] == [again.name]


def test_tf_hub_handle_resolves_through_the_hub_cache(saved_model, tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_hub", reason="tensorflow-hub 0.16 needs pkg_resources (setuptools<81)")
    source, path = saved_model
    handle = "https://tfhub.dev/tlpipe/tiny/feature_vector/1"
    hub_cache = tmp_path / "hub"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(hub_cache))
    storage.download(str(path), hub_cache / hashlib.sha1(handle.encode("utf8")).hexdigest())
    backbone = load_backbone(handle, SIZE)
    assert backbone.name == handle
    assert_same_features(source, backbone)


def test_tf_hub_handle_downloads_through_hubs_own_http_resolver_once(saved_model, tmp_path, monkeypatch):
    """The real download path of a handle (request with tf-hub-format=compressed, tar.gz unpacked into the
    cache), with tfhub.dev answered by a loopback server instead of the internet."""
    hub_resolver = pytest.importorskip("tensorflow_hub.resolver",
                                       reason="tensorflow-hub 0.16 needs pkg_resources (setuptools<81)")
    source, path = saved_model
    handle = "https://tfhub.dev/tlpipe/tiny/feature_vector/1"
    published = tmp_path / "site" / "tlpipe/tiny/feature_vector/1"  # a tar.gz with directory entries, as TF Hub serves
    published.parent.mkdir(parents=True)
    with tarfile.open(published, "w:gz") as archive:
        archive.add(path, arcname=".")
    monkeypatch.delenv("TFHUB_CACHE_DIR", raising=False)

    with serve(tmp_path / "site") as server:
        def to_loopback(self, request):
            url = urllib.parse.urlsplit(request.full_url)
            return urllib.request.urlopen(server.url(url.path.lstrip("/") + "?" + url.query))

        monkeypatch.setattr(hub_resolver.HttpResolverBase, "_call_urlopen", to_loopback)
        backbone = load_backbone(handle, SIZE, cache_dir=tmp_path / "cache")
        again = load_backbone(handle, SIZE, cache_dir=tmp_path / "cache")

    assert server.requests == ["/tlpipe/tiny/feature_vector/1?tf-hub-format=compressed"]  # once: then cached
    assert (tmp_path / "cache" / "tfhub").is_dir()
    assert_same_features(source, backbone)
    assert_same_features(source, again)


def test_missing_saved_model_is_a_clear_error(tmp_path, s3_bucket):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no saved_model.pb"):
        load_backbone(str(tmp_path / "empty"), SIZE)
    with pytest.raises(BackboneError, match="prefix is empty"):
        load_backbone(f"{s3_bucket}/nothing", SIZE, cache_dir=tmp_path)
    with pytest.raises(BackboneError, match="no saved_model.pb"):
        load_backbone(str(tmp_path / "not-there"), SIZE)


def test_saved_model_refuses_a_separate_weights_choice(saved_model):
    with pytest.raises(BackboneError, match="carries its own weights"):
        load_backbone(str(saved_model[1]), SIZE, weights="none")


def fine_tune_one_step(backbone, optimizer) -> None:
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Dense(2)(backbone.model(inputs, training=False))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(pixels(4), np.array([0, 1, 0, 1]), epochs=1, verbose=0)


def test_saved_model_fine_tunes_with_make_optimizer(saved_model):
    _, path = saved_model
    backbone = load_backbone(str(path), SIZE)
    assert set_trainable_top(backbone, 1) == ["saved_model"]
    layer = backbone.model.get_layer("saved_model")
    trainable = [v.name for v in layer.trainable_weights]
    assert trainable == ["conv_kernel_0", "conv_bias_0"], "BatchNorm gamma/beta must stay frozen"
    before = {v.name: v.numpy().copy() for v in layer.weights}
    fine_tune_one_step(backbone, make_optimizer("adam", 1e-2, backbone))
    after = {v.name: v.numpy() for v in layer.weights}
    assert not np.allclose(before["conv_kernel_0"], after["conv_kernel_0"])
    for frozen in ("bn_gamma_0", "bn_beta_0", "bn_moving_mean_0", "bn_moving_variance_0"):
        np.testing.assert_array_equal(before[frozen], after[frozen])


def test_plain_keras_adam_fails_on_raw_tfsm_variables(saved_model):
    """Why make_optimizer renames: TFSMLayer keeps TF names with ':' (drop the workaround if this starts passing)."""
    _, path = saved_model
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    assert any(":" in v.path for v in layer.trainable_weights)
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="not a valid scope name"):
        model.fit(pixels(4), np.array([0, 1, 0, 1]), epochs=1, verbose=0)


def test_unknown_optimizer_is_a_clear_error(saved_model):
    backbone = load_backbone(str(saved_model[1]), SIZE)
    with pytest.raises(BackboneError, match="optimizer 'adamz'"):
        make_optimizer("adamz", 1e-3, backbone)


# --- set_trainable_top ---------------------------------------------------------------------------

def trainable_layers(model: keras.Model) -> set[str]:
    found = set()
    for layer in model._flatten_layers(include_self=False):
        if layer.trainable and layer.trainable_weights and not layer._layers:
            found.add(layer.name)
    return found


def test_set_trainable_top_unfreezes_top_lite0_convs_only():
    backbone = load_backbone("efficientnet_lite0", SIZE, weights="none")
    units = backbone.fine_tune_units()
    assert len(units) == 49 and units[0].name == "head_conv" and units[-1].name == "stem_conv"
    unfrozen = set_trainable_top(backbone, 7)
    assert unfrozen == ["head_conv", *[f"{block}/{layer}_conv" for block in ("block7a", "block6d")
                                       for layer in ("project", "dw", "expand")]]
    trainable = {f"{unit.name}/{layer.name}" for unit in backbone.model.layers if isinstance(unit, keras.Model)
                 for layer in unit.layers if layer.trainable_weights}
    assert trainable == {"head/head_conv", *unfrozen[1:]}
    assert len(backbone.model.trainable_weights) == 7
    bn_layers = [layer for layer in backbone.model._flatten_layers()
                 if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bn_layers) == 49 and not any(layer.trainable for layer in bn_layers)
    assert [unit.name for unit in backbone.fine_tune_units()] == [unit.name for unit in units], "units are stable"


def test_set_trainable_top_can_keep_depthwise_kernels_frozen(tmp_path):
    """fine_tune_depthwise off: the depthwise convolutions among the top units keep their weights through a step,
    the 1x1 convolutions around them train; the units counted (and so the cut) are the same."""
    backbone = load_backbone("efficientnet_lite0", SIZE, cache_dir=tmp_path)
    unfrozen = set_trainable_top(backbone, 7, depthwise=False)
    assert unfrozen == ["head_conv", *[f"{block}/{layer}_conv" for block in ("block7a", "block6d")
                                       for layer in ("project", "expand")]]
    assert len(backbone.model.trainable_weights) == 5
    blocks = [backbone.model.get_layer(block) for block in ("block7a", "block6d")]
    depthwise = [block.get_layer("dw_conv") for block in blocks]
    pointwise = [block.get_layer("expand_conv") for block in blocks]
    before = [layer.kernel.numpy().copy() for layer in depthwise + pointwise]
    fine_tune_one_step(backbone, make_optimizer("adam", 1e-2, backbone))
    for index, layer in enumerate(depthwise):
        np.testing.assert_array_equal(layer.kernel.numpy(), before[index])
    for index, layer in enumerate(pointwise, start=len(depthwise)):
        assert not np.allclose(layer.kernel.numpy(), before[index]), layer.name


def test_set_trainable_top_counts_weighted_application_layers():
    backbone = load_backbone("mobilenet_v2", SIZE, weights="none")
    unfrozen = set_trainable_top(backbone, 4)
    assert unfrozen == ["Conv_1", "block_16_project", "block_16_depthwise", "block_16_expand"]
    assert trainable_layers(backbone.model) == set(unfrozen)
    assert not any(layer.trainable for layer in backbone.model._flatten_layers()
                   if isinstance(layer, keras.layers.BatchNormalization))
    assert set_trainable_top(backbone, 0) == [] and backbone.model.trainable_weights == []


def test_lite0_fine_tune_step_updates_only_unfrozen_blocks(tmp_path):
    backbone = load_backbone("efficientnet_lite0", SIZE, cache_dir=tmp_path)
    assert set_trainable_top(backbone, 1) == ["head_conv"]
    head = backbone.model.get_layer("head")
    frozen = backbone.model.get_layer("block7a")
    before = [v.numpy().copy() for v in head.weights + frozen.weights]
    fine_tune_one_step(backbone, make_optimizer("adam", 1e-2, backbone))
    after = [v.numpy() for v in head.weights + frozen.weights]
    assert not np.allclose(before[0], after[0]), "head conv kernel must change"
    for index in range(1, len(before)):
        np.testing.assert_array_equal(before[index], after[index])


def test_lite0_model_round_trips_through_a_keras_file(tmp_path):
    """The published model is a .keras file: Lite0 must reload with no custom objects and give the same output."""
    backbone = load_backbone("efficientnet_lite0", SIZE, cache_dir=tmp_path)
    set_trainable_top(backbone, 2)
    path = tmp_path / "lite0.keras"
    backbone.model.save(path)
    reloaded = keras.models.load_model(path)
    images = pixels()
    np.testing.assert_allclose(reloaded(images, training=False), backbone.model(images, training=False), atol=1e-5)
    assert not any(layer.trainable for layer in reloaded._flatten_layers()
                   if isinstance(layer, keras.layers.BatchNormalization))


def test_saved_model_backbones_only_come_from_the_deployments_locations(tmp_path, monkeypatch):
    from tasks import settings

    trusted, elsewhere = tmp_path / "trusted", tmp_path / "elsewhere"
    (trusted / "encoder").mkdir(parents=True)
    (elsewhere / "encoder").mkdir(parents=True)
    (trusted / "link").symlink_to(elsewhere / "encoder")
    monkeypatch.setenv("TLP_BACKBONE_LOCATIONS", f"{trusted},s3://models/backbones")
    monkeypatch.delenv("TLP_ALLOW_HUB_BACKBONES")
    deployment = settings.load()
    backbones.check_backbone_location(str(trusted / "encoder"), deployment)
    backbones.check_backbone_location("s3://models/backbones/encoder/", deployment)
    refused = [str(elsewhere / "encoder"), str(trusted / "link"), f"file://{trusted}/../elsewhere/encoder",
               "s3://models/backbones-evil/encoder", "s3://other/backbones/encoder",
               "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"]
    for spec in refused:
        with pytest.raises(BackboneError, match="backbone locations|TF Hub handles"):
            backbones.check_backbone_location(spec, deployment)
    with pytest.raises(BackboneError, match="backbone locations"):
        load_backbone(str(elsewhere / "encoder"), SIZE)
    assert load_backbone("mobilenet_v2", SIZE, weights="none").feature_dim == 1280
