"""A recipe's scheme assignment checked against a model's Linears, before any weight is read.

Names are the decoder Linears' full module names (``model.layers.3.mlp.down_proj``). What is
refused is what vLLM refuses when it loads the checkpoint: shards it fuses into one matrix
(q/k/v, gate/up) with different schemes, and FP8 block rows that would straddle two fused
shards (``validate_fp8_block_shape``: every shard but the last must be a whole number of
row blocks).
"""

from __future__ import annotations

import logging
from typing import Any

from .architectures import Architecture
from .errors import RecipeError
from .scheme import Scheme
from .targets import ANY_LINEAR, SchemeAssignment, fused_mismatches

log = logging.getLogger(__name__)


def decoder_linear_names(config: dict[str, Any], arch: Architecture) -> list[str]:
    layers = int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers"))
    return [f"{arch.layers_prefix}.{i}.{n}" for i in range(layers) for n in arch.linears]


def linear_rows(config: dict[str, Any], arch: Architecture) -> dict[str, int]:
    """Output features of each Linear of a decoder layer, by its name inside the layer."""
    from .planner import ModelShape, linear_shapes

    by_suffix = {ls.name: ls.out_features for ls in linear_shapes(ModelShape.from_config(config))}
    return {n: by_suffix[n.rsplit(".", 1)[-1]] for n in arch.linears if n.rsplit(".", 1)[-1] in by_suffix}


def resolve_assignment(assignment: SchemeAssignment, config: dict[str, Any], arch: Architecture,
                       where: str) -> dict[str, Scheme]:
    """The scheme of every quantized decoder Linear, by full name; RecipeError for a recipe
    vLLM could not load or one that quantizes nothing."""
    names = decoder_linear_names(config, arch)
    resolved = assignment.resolve(names)
    if not resolved:
        raise RecipeError(f"{where}: quantization.targets and ignore leave no Linear to quantize",
                          field="quantization.ignore", value=list(assignment.ignore),
                          hint="narrow ignore or widen targets")
    unmatched = [p for p in assignment.unmatched(names) if p not in (ANY_LINEAR, "lm_head")]
    if unmatched:
        log.warning("%s: these patterns match no decoder Linear: %s", where, ", ".join(unmatched))
    layers = sorted({n[: -len(arch.linears[0]) - 1] for n in names if n.endswith(arch.linears[0])})
    sets = [g.linears for g in arch.groups if len(g.linears) > 1]
    fused = [[f"{layer}.{n}" for n in s] for layer in layers for s in sets]
    bad = fused_mismatches(resolved, fused)
    if bad:
        shards = bad[0]
        raise RecipeError(
            f"{where}: {', '.join(shards)} get different schemes, but vLLM fuses them into one matrix with "
            "one scheme", field="quantization.overrides", value=shards,
            hint="give every Linear of a fused set (q/k/v, gate/up) the same override or ignore")
    rows = linear_rows(config, arch)
    for layer in layers:
        for s in sets:
            _check_blocks(resolved, layer, s, rows, where)
    return resolved


def _check_blocks(resolved: dict[str, Scheme], layer: str, shards: tuple[str, ...], rows: dict[str, int],
                  where: str) -> None:
    scheme = resolved.get(f"{layer}.{shards[0]}")
    if scheme is None or scheme.weights.strategy != "block":
        return
    edge = scheme.weights.block_size[0]
    for name in shards[:-1]:
        if rows.get(name, 0) % edge:
            raise RecipeError(
                f"{where}: {layer}.{name} has {rows[name]} output rows, not a multiple of the {edge}-row FP8 "
                f"block; vLLM fuses it with {shards[-1]} and refuses blocks that straddle them",
                field="quantization.block_structure", value=edge,
                hint="use a block that divides it (block_structure: [64, 64]) or ignore these Linears")
