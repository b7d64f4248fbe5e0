"""The few facts about a family that tracing its layer cannot decide.

Everything else in a layer graph is derived from the model's own code and checked
numerically. An entry here names the transformers ``model_type`` of the text config, what it
changes, and why tracing cannot see it; keep it to facts about how the checkpoint is served
or calibrated, never about channel flow (which the derivation proves).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .types import LayerGraph, Unquantized


@dataclass(frozen=True)
class Override:
    why: str
    keep_float: tuple[str, ...] = ()  # Linears (names in the layer) to leave unquantized
    unsupported: str | None = None


OVERRIDES: dict[str, Override] = {
    # A text-only forward skips Mllama's cross-attention layers (they read image states), so
    # calibration never reaches them: tracing sees a layer that runs, serving does not.
    "mllama_text_model": Override(
        why="cross-attention layers run only with image inputs, which text calibration never gives",
        unsupported="Mllama's text decoder interleaves cross-attention layers that text-only calibration "
                    "never runs"),
}


def override_for(config, graph: LayerGraph) -> LayerGraph:
    """``graph`` with its family's override applied, if it has one."""
    entry = OVERRIDES.get(getattr(config, "model_type", ""))
    if entry is None:
        return graph
    units = tuple(u for u in graph.units if u.name not in entry.keep_float)
    groups = tuple(replace(g, linears=tuple(n for n in g.linears if n not in entry.keep_float))
                   for g in graph.groups)
    kept = tuple(Unquantized(n, entry.why) for n in entry.keep_float)
    return replace(graph, units=units, groups=tuple(g for g in groups if g.linears),
                   unquantized=graph.unquantized + kept,
                   unsupported=graph.unsupported or entry.unsupported)
