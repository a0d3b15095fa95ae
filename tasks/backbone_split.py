"""Cut a backbone in two on a clean boundary: a frozen bottom and a top to fine-tune.

Fine-tuning the top units of a backbone leaves everything below them unchanged
(frozen weights, BatchNorm in inference mode), so the bottom maps each image to
the same boundary activations every epoch. Computed once and cached
(tasks/activation_cache.py), they let the epochs run only the top and the head:
training on them is exactly training on the images, at a fraction of the cost.

A cut is clean where every path from the pixels to the features passes through
one tensor (no skip connection crosses it); then top(bottom(x)) is exactly
backbone(x). The clean tensors are found in the graph itself:

- efficientnet_lite0 is a chain of sub-models (preprocess, stem, block1a ...
  block7a, head, avg_pool): every sub-model boundary is a cut.
- a keras.applications backbone wraps the application model, which holds every
  unit; its layer graph has cuts between residual blocks and between the layers
  of blocks without a skip.
- a SavedModel / TF Hub backbone is one opaque unit: the cut is before it
  (bottom = preprocessing only) or after it (bottom = the whole backbone).

Rounding: `fine_tune_layers` N (the run param, counted as
Backbone.fine_tune_units counts) goes to the clean cut whose number of units
above is nearest to N; a tie goes to the deeper cut (more units), and N >= 1
always unfreezes at least one unit. For Lite0, 20 gives 19 (cut before block5c).
N = 0 cuts at the output: the bottom is the whole backbone (its activations are
the pooled features of feature extraction) and the top is the identity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

from tasks.backbones import Backbone, set_trainable_top
from tasks.errors import BackboneError

log = logging.getLogger(__name__)

OUTPUT = "output"  # the cut's name when nothing is above it


@dataclass
class Split:
    """A backbone cut in two; top(bottom(pixels)) == backbone.model(pixels).

    Both parts share their layers with `backbone.model`: training the top
    trains the backbone, so `compose(backbone, head)` afterwards is the
    fine-tuned classifier. Call both with training=False.
    """

    bottom: keras.Model  # RAW pixels -> boundary activations; every layer frozen
    top: keras.Model  # boundary activations -> pooled features; its units unfrozen, BatchNorm frozen
    cut: str  # the first layer above the cut ("block5c"), or "output" when the top is the identity
    units: int  # fine-tune units above the cut: all of them unfrozen, or all but the depthwise ones
    unfrozen: list[str]  # the unfrozen units' names, top-down, as set_trainable_top gives them

    @property
    def boundary_shape(self) -> tuple[int, ...]:
        """The shape of one image's boundary activations, e.g. (6, 6, 80)."""
        return tuple(int(d) for d in self.bottom.output_shape[1:])


@dataclass(frozen=True)
class _Cut:
    """A clean tensor of one functional graph, and what is above it."""

    tensor: keras.KerasTensor
    first_above: str
    units: int


def split_backbone(backbone: Backbone, fine_tune_layers: int, depthwise: bool = True) -> Split:
    """Cut `backbone` at the clean boundary nearest `fine_tune_layers` units from the top, unfreezing what is above
    (its depthwise convolutions only when `depthwise`).

    Sets the backbone's trainable flags as set_trainable_top does for the
    rounded count (see the module docstring for the rounding).
    """
    split = cut_backbone(backbone, fine_tune_layers)
    split.unfrozen = set_trainable_top(backbone, split.units, depthwise)
    where = "at the output (top = identity)" if split.cut == OUTPUT else f"before {split.cut}"
    log.info("%s: fine_tune_layers=%d -> cut %s, %d of %d units above, boundary activations %s",
             backbone.name, fine_tune_layers, where, split.units, len(backbone.fine_tune_units()),
             split.boundary_shape)
    return split


def cut_backbone(backbone: Backbone, fine_tune_layers: int) -> Split:
    """The cut split_backbone makes, leaving every trainable flag as it is (nothing listed as unfrozen): where
    feature extraction, whose backbone stays frozen, finds fine-tuning's boundary activations."""
    if fine_tune_layers < 0:
        raise BackboneError(f"fine_tune_layers={fine_tune_layers}: use 0 (cut at the output) or more")
    unit_ids = {id(layer) for layer in backbone.fine_tune_units()}
    wrappers, graph = _cut_graph(backbone.model, unit_ids)
    cut = _nearest(_clean_cuts(graph, unit_ids), fine_tune_layers)
    return Split(bottom=_bottom(wrappers, graph, cut.tensor), top=_top(wrappers, graph, cut.tensor),
                 cut=cut.first_above, units=cut.units, unfrozen=[])


def _cut_graph(model: keras.Model, unit_ids: set[int]) -> tuple[list[tuple[keras.Model, object]], keras.Model]:
    """The functional graph to cut in, and the (wrapper, its node calling the next) pairs around it.

    A model in which one nested functional model holds every unit (the
    keras.applications wrapper: Input -> Rescaling -> application) is cut
    inside that nested model; otherwise (Lite0's blocks, a TFSMLayer) at its own level.
    """
    wrappers = []
    while True:
        holders = [node for node in _nodes(model) if _units_in(node.operation, unit_ids)]
        inner = holders[0].operation if len(holders) == 1 else None
        if not (isinstance(inner, keras.Model) and hasattr(inner, "_nodes_by_depth")):
            return wrappers, model
        wrappers.append((model, holders[0]))
        model = inner


def _nodes(model: keras.Model) -> list:
    """The model's graph nodes, inputs first (every node after the nodes it reads)."""
    if not hasattr(model, "_nodes_by_depth"):
        raise BackboneError(f"backbone model {model.name!r} is not a functional Keras model; only functional "
                            "backbones (every registry backbone) can be cut")
    return [node for depth in sorted(model._nodes_by_depth, reverse=True) for node in model._nodes_by_depth[depth]]


def _units_in(layer: keras.layers.Layer, unit_ids: set[int]) -> int:
    return sum(id(sub) in unit_ids for sub in layer._flatten_layers(include_self=True))


def _clean_cuts(model: keras.Model, unit_ids: set[int]) -> list[_Cut]:
    """Every tensor all input -> output paths pass through, input to output.

    In a topological order of the tensors, a tensor is such a cut exactly when
    no edge jumps over it (from before it to after it).
    """
    nodes = _nodes(model)
    tensors = [(tensor, node) for node in nodes for tensor in node.output_tensors]
    position = {id(tensor): index for index, (tensor, _) in enumerate(tensors)}
    furthest = list(range(len(tensors)))  # per tensor: the furthest tensor an edge from it reaches
    for node in nodes:
        for source in node.input_tensors:
            for target in node.output_tensors:
                furthest[position[id(source)]] = max(furthest[position[id(source)]], position[id(target)])
    units_from = [0] * (len(tensors) + 1)  # units in the operations of tensors[index:]
    for index in reversed(range(len(tensors))):
        units_from[index] = units_from[index + 1] + _units_in(tensors[index][1].operation, unit_ids)
    cuts, reach = [], 0
    for index, (tensor, _) in enumerate(tensors):
        if reach <= index:
            above = tensors[index + 1][1].operation.name if index + 1 < len(tensors) else OUTPUT
            cuts.append(_Cut(tensor, above, units_from[index + 1]))
        reach = max(reach, furthest[index])
    return cuts


def _nearest(cuts: list[_Cut], wanted: int) -> _Cut:
    """The cut with units above nearest `wanted` (ties: more units; at least one unit when any is wanted).

    Among cuts with the same units above, the one nearest the output: the
    bottom then does all the frozen work.
    """
    highest = {cut.units: cut for cut in cuts}  # later (higher) cuts overwrite earlier ones
    allowed = [units for units in highest if units >= 1 or wanted == 0]
    return highest[min(allowed, key=lambda units: (abs(units - wanted), -units))]


def _bottom(wrappers: list[tuple[keras.Model, object]], graph: keras.Model, cut: keras.KerasTensor) -> keras.Model:
    """Pixels -> the wrappers' layers before the nested model -> the graph up to the cut."""
    pixels = keras.Input(wrappers[0][0].input_shape[1:] if wrappers else graph.input_shape[1:], name="pixels")
    x = pixels
    for wrapper, node in wrappers:
        x = _segment(wrapper.inputs[0], node.input_tensors[0], f"{wrapper.name}_before")(x)
    return keras.Model(pixels, _segment(graph.inputs[0], cut, f"{graph.name}_bottom")(x), name="bottom")


def _top(wrappers: list[tuple[keras.Model, object]], graph: keras.Model, cut: keras.KerasTensor) -> keras.Model:
    """Boundary activations -> the graph from the cut -> the wrappers' layers after the nested model."""
    boundary = keras.Input(tuple(cut.shape[1:]), name="boundary")
    x = _segment(cut, graph.outputs[0], f"{graph.name}_top")(boundary)
    for wrapper, node in reversed(wrappers):
        x = _segment(node.output_tensors[0], wrapper.outputs[0], f"{wrapper.name}_after")(x)
    return keras.Model(boundary, x, name="top")


def _segment(start: keras.KerasTensor, end: keras.KerasTensor, name: str) -> keras.Model:
    """The layers between two tensors of one graph as a model sharing those layers (identity if start is end)."""
    if start is end:
        inputs = keras.Input(tuple(start.shape[1:]))
        return keras.Model(inputs, keras.layers.Identity()(inputs), name=name)
    return keras.Model(start, end, name=name)
