"""Static activation parameters the weight methods calibrate: NVFP4's input global scale.

NVFP4 W4A4 computes each token group's FP8 scale at run time but divides them all by one
global scale per Linear, fixed from calibration: ``448 · 6 / max|x|`` over every calibration
token (compressed-tensors' ``static_minmax`` observer). Linears reading one input share it,
which is also what vLLM needs for the matrices it fuses (it keeps one per fused matrix).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..graph.types import LayerGraph
from ..grids import global_scale
from ..scheme import QuantizedWeight, Scheme
from .observers import AbsMax


def observes_inputs(scheme: Scheme) -> bool:
    """Whether ``scheme`` has an activation parameter fixed from calibration data."""
    act = scheme.input_activations
    return act is not None and act.has_global_scale


@dataclass
class InputGlobals:
    """The input maxima to observe (``stats``, reduced by MAX over the ranks), then ``apply``
    puts the global scales on the weights."""

    members: dict[str, list[str]] = field(default_factory=dict)  # observed Linear -> Linears it serves
    schemes: Mapping[str, Scheme] = field(default_factory=dict)
    stats: dict[str, AbsMax] = field(init=False)

    def __post_init__(self) -> None:
        self.stats = {name: AbsMax() for name in self.members}

    def apply(self, quantized: dict[str, QuantizedWeight]) -> None:
        for observed, names in self.members.items():
            for n in names:
                act = self.schemes[n].input_activations
                quantized[n].input_global_scale = global_scale(self.stats[observed].amax, act.grid)


def observe_input_globals(graph: LayerGraph, schemes: Mapping[str, Scheme]) -> InputGlobals:
    """What to watch for the units of ``schemes`` that need an input global scale."""
    members = {}
    for g in graph.groups:
        names = [n for n in g.linears if n in schemes and observes_inputs(schemes[n])]
        if names:
            members[g.key] = names
    return InputGlobals(members=members, schemes=schemes)
