"""A layer's input groups in the stages a sequential quantizer calibrates one after another.

Each stage costs one more calibration pass over the layer, so a stage is every group of the
layer that can be calibrated at once without losing an upstream group's quantized output:
each group outside the experts is a stage of its own (in the graph's order, the order the
forward reaches them), and the experts of one Mixture-of-Experts block make two, whatever
their number: the groups that read the block's input (gate/up), then those that read an
expert's own product (down_proj). A 128-expert layer thus takes as many passes as a dense one.
"""

from __future__ import annotations

from dataclasses import replace

from .experts import expert_of
from .types import InputGroup, LayerGraph


def sequential_stages(graph: LayerGraph) -> list[LayerGraph]:
    """``graph`` split into its stages, in calibration order (each a graph of its groups and
    their units)."""
    stages: dict[object, list[InputGroup]] = {}
    for g in graph.groups:
        hit = expert_of(g.linears[0])
        # quantkit names every expert's Linears gate_proj/up_proj/down_proj (``names.per_expert``);
        # a down_proj's producer is not always a Linear the graph names (gpt-oss' clamped GLU).
        key = (hit[0], g.linears[0].endswith("down_proj")) if hit is not None else g.key
        stages.setdefault(key, []).append(g)
    out = []
    for groups in stages.values():
        names = {n for g in groups for n in g.linears}
        out.append(replace(graph, units=tuple(u for u in graph.units if u.name in names), groups=tuple(groups)))
    return out
