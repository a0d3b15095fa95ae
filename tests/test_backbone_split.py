"""Cutting a backbone on a clean boundary: where each family cuts, the rounding, and bottom -> top == backbone."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from tasks.backbone_split import OUTPUT, split_backbone
from tasks.backbones import BackboneError, load_backbone, set_trainable_top
from tests.helpers.backbones import SIZE, pixels


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0", SIZE, weights="none")


def assert_exact_split(backbone, split) -> None:
    """top(bottom(x)) is the backbone's output; only the top's units train, and exactly the unfrozen ones."""
    images = pixels(3)
    np.testing.assert_allclose(split.top(split.bottom(images, training=False), training=False),
                               backbone.model(images, training=False), rtol=1e-5, atol=1e-5)
    assert split.bottom.trainable_weights == []
    expected = {id(layer) for layer in backbone.fine_tune_units()[:split.units]}
    top_units = {id(layer) for layer in split.top._flatten_layers() if layer.trainable_weights and not layer._layers}
    assert top_units == expected
    assert len(split.unfrozen) == split.units
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                   for layer in split.top._flatten_layers())


@pytest.mark.parametrize("wanted, cut, units", [
    (20, "block5c", 19),  # 19 is nearer than 22
    (2, "head", 1),
    (3, "block7a", 4),
    (47, "block1a", 48),  # a tie (46 or 48) goes to the deeper cut
    (1000, "stem", 49),  # everything: the bottom is the preprocessing only
])
def test_lite0_cuts_between_blocks_at_the_nearest_boundary(lite0, wanted, cut, units):
    split = split_backbone(lite0, wanted)

    assert (split.cut, split.units) == (cut, units)
    assert split.unfrozen == set_trainable_top(lite0, units)
    assert_exact_split(lite0, split)


def test_lite0_cut_at_zero_units_makes_the_bottom_the_feature_extractor(lite0):
    split = split_backbone(lite0, 0)

    assert (split.cut, split.units, split.unfrozen) == (OUTPUT, 0, [])
    assert split.boundary_shape == (1280,)
    assert split.top.trainable_weights == [] and lite0.model.trainable_weights == []
    assert_exact_split(lite0, split)


def test_cut_is_logged_with_what_was_asked_and_what_was_unfrozen(lite0, caplog):
    with caplog.at_level("INFO", logger="tasks.backbone_split"):
        split_backbone(lite0, 20)
    assert "fine_tune_layers=20 -> cut before block5c, 19 of 49 units above, boundary activations (2, 2, 112)" \
        in caplog.text


@pytest.mark.parametrize("name, wanted, cut, units", [
    ("mobilenet_v2", 2, "block_16_project", 2),  # a block without a skip: cuts between its layers too
    ("mobilenet_v2", 6, "block_15_expand", 7),  # no cut inside residual block 15: 4 or 7 units
    ("resnet50_v2", 20, "conv4_block4_preact_bn", 19),  # whole residual blocks of 3 convs
    ("efficientnet_b0", 20, "block6b_expand_conv", 21),  # squeeze-excite branches stay inside a block
])
def test_keras_application_cuts_where_no_skip_connection_crosses(name, wanted, cut, units):
    backbone = load_backbone(name, SIZE, weights="none")
    split = split_backbone(backbone, wanted)

    assert (split.cut, split.units) == (cut, units)
    assert_exact_split(backbone, split)
    everything = split_backbone(backbone, 10_000)
    assert everything.units == len(backbone.fine_tune_units())
    assert_exact_split(backbone, everything)


def test_saved_model_cuts_only_before_or_after_its_one_opaque_unit(saved_model):  # noqa: F811
    backbone = load_backbone(str(saved_model[1]), SIZE)

    split = split_backbone(backbone, 5)
    assert (split.cut, split.units, split.unfrozen) == ("saved_model", 1, ["saved_model"])
    assert split.boundary_shape == (SIZE, SIZE, 3)  # the bottom is the x / 255 preprocessing only
    images = pixels(3)
    np.testing.assert_allclose(split.bottom(images, training=False), images / 255, rtol=1e-6)
    np.testing.assert_allclose(split.top(split.bottom(images, training=False), training=False),
                               backbone.model(images, training=False), rtol=1e-5, atol=1e-6)
    assert [v.name for v in split.top.trainable_weights] == ["conv_kernel_0", "conv_bias_0"]
    assert split_backbone(backbone, 0).cut == OUTPUT


def test_negative_units_are_refused(lite0):
    with pytest.raises(BackboneError, match="fine_tune_layers=-1"):
        split_backbone(lite0, -1)
