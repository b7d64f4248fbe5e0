"""A recipe's scheme assignment checked against a model's Linears, before any weight is read.

Names are the decoder units' full module names (``model.layers.3.mlp.down_proj``) from the
layer graph, which also says which sets vLLM fuses (``InputGroup.fused``). What is refused is
what vLLM refuses when it loads the checkpoint: shards it fuses into one matrix (q/k/v,
gate/up) with different schemes, and FP8 block rows that would straddle two fused shards
(``validate_fp8_block_shape``: every shard but the last must be a whole number of row blocks).
"""

from __future__ import annotations

import logging

from .errors import RecipeError
from .graph.model import ModelGraph
from .scheme import Scheme
from .targets import ANY_LINEAR, SchemeAssignment, fused_mismatches

log = logging.getLogger(__name__)


def decoder_linear_names(graph: ModelGraph) -> list[str]:
    """Every quantizable unit of the decoder layers, by full name (``model.layers.3.mlp.down_proj``)."""
    return [graph.layer_prefix(i) + n for i in range(len(graph.kinds)) for n in graph.layer(i).linears]


def resolve_assignment(assignment: SchemeAssignment, graph: ModelGraph, where: str) -> dict[str, Scheme]:
    """The scheme of every quantized decoder unit, by full name; RecipeError for a recipe
    vLLM could not load or one that quantizes nothing."""
    names = decoder_linear_names(graph)
    resolved = assignment.resolve(names)
    if not resolved:
        raise RecipeError(f"{where}: quantization.targets and ignore leave no Linear to quantize",
                          field="quantization.ignore", value=list(assignment.ignore),
                          hint="narrow ignore or widen targets")
    unmatched = [p for p in assignment.unmatched(names) if p not in (ANY_LINEAR, "lm_head")]
    if unmatched:
        log.warning("%s: these patterns match no decoder Linear: %s", where, ", ".join(unmatched))
    for i in range(len(graph.kinds)):
        prefix, layer = graph.layer_prefix(i), graph.layer(i)
        sets = [s for g in layer.groups for s in g.fused if len(s) > 1]
        bad = fused_mismatches(resolved, [[prefix + n for n in s] for s in sets])
        if bad:
            raise RecipeError(
                f"{where}: {', '.join(bad[0])} get different schemes, but vLLM fuses them into one matrix with "
                "one scheme", field="quantization.overrides", value=bad[0],
                hint="give every Linear of a fused set (q/k/v, gate/up) the same override or ignore")
        for s in sets:
            _check_blocks(resolved, prefix, s, {n: layer.unit(n).out_features for n in s}, where)
    return resolved


def _check_blocks(resolved: dict[str, Scheme], prefix: str, shards: tuple[str, ...], rows: dict[str, int],
                  where: str) -> None:
    scheme = resolved.get(prefix + shards[0])
    if scheme is None or scheme.weights.strategy != "block":
        return
    edge = scheme.weights.block_size[0]
    for name in shards[:-1]:
        if rows[name] % edge:
            raise RecipeError(
                f"{where}: {prefix}{name} has {rows[name]} output rows, not a multiple of the {edge}-row FP8 "
                f"block; vLLM fuses it with {shards[-1]} and refuses blocks that straddle them",
                field="quantization.block_structure", value=edge,
                hint="use a block that divides it (block_structure: [64, 64]) or ignore these Linears")
