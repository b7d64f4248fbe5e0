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
    # vLLM builds Qwen2-MoE's shared-expert gate (a [1, hidden] Linear scaling the shared
    # expert's output through a sigmoid) as a plain torch.nn.Linear outside any quantization
    # config (vllm/model_executor/models/qwen2_moe.py), so it can only load it in float; the
    # trace sees an ordinary Linear.
    "qwen2_moe": Override(why="vLLM loads it as a plain float Linear (no quantization method)",
                          keep_float=("mlp.shared_expert_gate",)),
    # Llama 4's router is an nn.Linear subclass whose own forward runs the topk and returns the
    # scores after it, so the trace records the module's output downstream of the topk, not
    # the logits reaching it; vLLM builds it as a float GateLinear (models/llama4.py, Llama4MoE).
    "llama4_text": Override(why="router: its output picks experts (kept in float, as vLLM does)",
                            keep_float=("feed_forward.router",)),
}


def override_for(config, graph: LayerGraph) -> LayerGraph:
    """``graph`` with its family's override applied, if it has one."""
    entry = OVERRIDES.get(getattr(config, "model_type", ""))
    if entry is None:
        return graph
    units = tuple(u for u in graph.units if u.name not in entry.keep_float)
    groups = tuple(replace(g, linears=tuple(n for n in g.linears if n not in entry.keep_float))
                   for g in graph.groups)
    kept = tuple(Unquantized(n, entry.why) for n in entry.keep_float if n in graph.linears)
    return replace(graph, units=units, groups=tuple(g for g in groups if g.linears),
                   unquantized=graph.unquantized + kept,
                   unsupported=graph.unsupported or entry.unsupported)
