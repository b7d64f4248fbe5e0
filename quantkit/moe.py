"""Calibrating Mixture-of-Experts layers: which tokens each expert's statistics see, and what
happens to an expert that saw too few.

With ``all_experts`` (the default) every token goes through every expert while the layer's
output keeps only the routed ones (``graph.experts.UnfusedExperts``), so no expert is starved
however the router behaves on the calibration text. Without it an expert sees only the
tokens routed to it, and one the router (almost) never picks has no statistics worth the
name: below ``min_tokens`` it is quantized by round-to-nearest instead, with a warning naming
it, rather than getting a Hessian or a range from a handful of tokens (or none).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import nn

from .distributed import SINGLE, World
from .graph.experts import expert_of
from .graph.types import InputGroup, LayerGraph
from .quantizers.rtn import quantize_rtn
from .scheme import QuantizedWeight, Scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertCalibration:
    all_experts: bool = True
    min_tokens: int = 32


@dataclass
class ExpertReport:
    """Routed-token counts per experts module (full name) and the experts that fell back."""

    routed: dict[str, list[int]] = field(default_factory=dict)
    statistics_tokens: dict[str, list[int]] = field(default_factory=dict)
    rtn_fallback: list[str] = field(default_factory=list)


def statistics_tokens(routed: list[int], all_tokens: int, settings: ExpertCalibration) -> list[int]:
    """Tokens each expert's statistics come from: every calibration token under all-expert
    calibration, its routed tokens otherwise."""
    return [all_tokens] * len(routed) if settings.all_experts else list(routed)


def starved(counts: dict[str, list[int]], settings: ExpertCalibration) -> set[tuple[str, int]]:
    """``(experts module, expert)`` whose statistics saw fewer than ``min_tokens`` tokens."""
    return {(name, e) for name, per in counts.items() for e, n in enumerate(per) if n < settings.min_tokens}


def without(graph: LayerGraph, experts: set[tuple[str, int]]) -> LayerGraph:
    """``graph`` with the units of ``experts`` removed (a quantizer never sees them)."""
    if not experts:
        return graph

    def kept(name: str) -> bool:
        return expert_of(name) not in experts

    groups = []
    for g in graph.groups:
        names = tuple(n for n in g.linears if kept(n))
        if names:
            groups.append(InputGroup(names, g.producer, tuple(f for f in g.fused if all(kept(n) for n in f))))
    return replace(graph, units=tuple(u for u in graph.units if kept(u.name)), groups=tuple(groups))


# Statistics of one calibration pass may take at most this share of the device's free memory.
STATISTICS_SHARE = 0.5


def statistics_budget(device: torch.device, world: World = SINGLE) -> int | None:
    """Bytes one calibration pass's statistics may take: a share of the GPU's free memory,
    the least over the ranks (every rank must split the layer alike: each part is one pass
    with its collectives); None (no limit) on the CPU, whose memory the operating system
    manages."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    least = world.all_reduce(torch.tensor([free], dtype=torch.int64, device=world.device), "min")
    return int(int(least.item()) * STATISTICS_SHARE)


def expert_owners(graph: LayerGraph, world: World = SINGLE) -> dict[tuple[str, int], int]:
    """The rank that holds and solves each MoE expert of ``graph``, by estimated cost (each
    Linear's ``in² · (in + out)``, what its GPTQ solve takes), decided before any statistic
    and the same on every rank."""
    costs: dict[str, float] = {}
    experts: dict[str, tuple[str, int]] = {}
    for u in graph.units:
        hit = expert_of(u.name)
        if hit is not None:
            key = f"{hit[0]}.{hit[1]}"
            experts[key] = hit
            costs[key] = costs.get(key, 0.0) + float(u.in_features) ** 2 * (u.in_features + u.out_features)
    return {experts[k]: r for k, r in world.owners(costs).items()}


def statistics_chunks(graph: LayerGraph, budget: int | None,
                      owners: Mapping[tuple[str, int], int] | None = None, matrices: int = 1) -> list[LayerGraph]:
    """``graph`` split so that each part's float32 statistics (``matrices`` ``[in, in]``
    matrices per input group: GPTQ keeps one, GPTAQ's paired statistics two, the quantized
    inputs' Hessian and the cross term) fit ``budget`` bytes on every rank: the first part holds every
    group not owned by a single expert (attention, a shared expert, and, under all-expert
    calibration, every expert's gate/up, which share one matrix), which every rank holds, plus
    the first experts' own groups, which their owner rank (``owners``) alone holds (an expert
    ``owners`` does not name counts as rank 0's, as on one rank); each further part holds only
    experts' own groups. Each part costs one more calibration pass, so a layer is split only
    when it must be (DeepSeek-V3 with per-expert Hessians: ~57 GB): on N ranks a part holds
    about N times the experts it holds on one."""
    owned: dict[tuple[str, int], list[InputGroup]] = {}
    common: list[InputGroup] = []
    for g in graph.groups:
        hits = {expert_of(n) for n in g.linears}
        if len(hits) == 1 and None not in hits:
            owned.setdefault(hits.pop(), []).append(g)
        else:
            common.append(g)

    def size(groups: list[InputGroup]) -> int:
        return sum(4 * matrices * graph.unit(g.key).in_features ** 2 for g in groups)

    owners = owners or {}
    per_rank: Counter[int] = Counter()
    for expert, groups in owned.items():
        per_rank[owners.get(expert, 0)] += size(groups)
    if budget is None or size(common) + max(per_rank.values(), default=0) <= budget:
        return [graph]
    parts: list[list[InputGroup]] = [list(common)]
    base, held = size(common), {}  # bytes every rank holds in the part; each owner's experts' bytes
    for expert, groups in owned.items():
        r = owners.get(expert, 0)
        if held and base + held.get(r, 0) + size(groups) > budget:  # at least one expert per part
            parts.append([])
            base, held = 0, {}
        parts[-1].extend(groups)
        held[r] = held.get(r, 0) + size(groups)
    out = []
    for groups in parts:
        names = {n for g in groups for n in g.linears}
        out.append(replace(graph, units=tuple(u for u in graph.units if u.name in names), groups=tuple(groups)))
    return out


def rtn_fallback(layer: nn.Module, graph: LayerGraph, experts: set[tuple[str, int]], scheme: Scheme,
                 quantized: dict[str, QuantizedWeight], where: str) -> list[str]:
    """Round-to-nearest for every unit of ``experts`` (added to ``quantized``); returns their
    names. A static input scale, which RTN cannot observe, is the largest its sibling experts
    got for the same projection (they read the same kind of tokens, and vLLM serves one scale
    per fused expert weight anyway)."""
    ws = replace(scheme.weights, actorder=None)
    rtn_scheme = Scheme(ws, scheme.input_activations)
    names = []
    for u in graph.units:
        hit = expert_of(u.name)
        if hit is None or hit not in experts:
            continue
        qw = quantize_rtn(u.matrix(layer).detach(), rtn_scheme)
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            leaf = u.name.rpartition(".")[2]
            sib = [q.input_scale for n, q in quantized.items() if q.input_scale is not None and
                   (h := expert_of(n)) is not None and h[0] == hit[0] and n.endswith("." + leaf)]
            if not sib:
                raise ValueError(f"{where}.{u.name}: no expert of its block was calibrated; a static input scale "
                                 "cannot be chosen (calibrate with calibration.all_experts: true)")
            qw = replace(qw, input_scale=torch.stack(sib).amax(0))
        quantized[u.name] = qw
        names.append(u.name)
    for name, e in sorted(experts):
        log.warning("%s.%s.%d: too few calibration tokens reached this expert (calibration.min_expert_tokens); "
                    "quantized by round-to-nearest", where, name, e)
    return names
