"""The whole model's graph: one ``LayerGraph`` per decoder-layer type, and what lies outside
the decoder layers (embedding, final norm, lm_head, vision tower, projector, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError
from .derive import derive_layer_graph
from .instance import signature
from .skeleton import DecoderLocation
from .types import LayerGraph


@dataclass(frozen=True)
class ModelGraph:
    """``types[kinds[i]]`` is the graph of decoder layer ``i``."""

    architecture: str
    location: DecoderLocation
    types: tuple[LayerGraph, ...]
    kinds: tuple[int, ...]

    def layer(self, i: int) -> LayerGraph:
        return self.types[self.kinds[i]]

    def layers_of(self, t: int) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == t]

    def layer_prefix(self, i: int) -> str:
        return f"{self.location.layers}.{i}."

    def check_supported(self, where: str) -> None:
        """Refuse, before any weight is read, a model with a layer type quantkit cannot process:
        one line naming the layer and the reason."""
        for t, g in enumerate(self.types):
            if g.unsupported:
                idx = self.layers_of(t)
                shown = ", ".join(map(str, idx[:4])) + (", ..." if len(idx) > 4 else "")
                raise ModelError(f"{where}: {self.location.layers}.{idx[0]} ({g.layer_class}, layers {shown}): "
                                 f"{g.unsupported}", field="model.id",
                                 hint="this layer type cannot be quantized yet")


def derive_model_graph(model: nn.Module, location: DecoderLocation) -> ModelGraph:
    """Derive (or fetch from the cache) the graph of every decoder-layer type of ``model``
    (the meta skeleton); layers of one structure share one graph."""
    decoder = model.get_submodule(location.text_model) if location.text_model else model
    layers_attr = location.layers[len(location.text_model) + 1:] if location.text_model else location.layers
    layers = decoder.get_submodule(layers_attr)
    seen: dict[tuple, int] = {}
    types: list[LayerGraph] = []
    kinds: list[int] = []
    for i, layer in enumerate(layers):
        sig = signature(layer)
        if sig not in seen:
            seen[sig] = len(types)
            types.append(derive_layer_graph(decoder, layers_attr, i))
        kinds.append(seen[sig])
    return ModelGraph(type(model).__name__, location, tuple(types), tuple(kinds))
