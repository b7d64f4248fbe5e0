"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian.

Follows the IST-DASLab reference (``gptq.py``): dead columns, dampening, the upper Cholesky
factor of ``H⁻¹``, and lazy block updates. Two deliberate differences, both documented
where they happen: a failed Cholesky is retried with more damping instead of crashing, and
with dynamic groups the block size is a multiple of the group size so each group's scale
is taken from its fully error-updated weights (the reference reads stale columns when the
group is smaller than the block).

Every grid works the same way (``quantkit.grids``): a column is divided by its scale and
rounded onto the scheme's grid (int, FP8 E4M3, FP4 E2M1). Column groups are the scheme's
groups (group, tensor_group) or its blocks' columns (block: one scale per row block within
the group); a tensor_group scheme's global scale is fixed from the whole weight first, as
llm-compressor does, and its group scales are rounded to E4M3 (E8M0 for MXFP4) as they are
taken.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import NumericsError
from ..grids import effective_scale, round_to_grid
from ..scheme import QuantizedWeight, Scheme, WeightScheme
from ..distributed import SINGLE, World
from ..graph.experts import expert_of
from .activation_params import observe_input_globals
from .base import Joined, LayerCalibration, Quantizer, register_quantizer, solve_units
from .clip import clip_to_gram, group_grams
from .hessian import HessianAccumulator
from .rtn import fused_global_scales, weight_global_scale, weight_only_scheme, weight_qparams
from .scheme_params import SchemeParams

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


def _inverse_hessian_factor(
    h: torch.Tensor, dampening_frac: float, name: str, max_retries: int = MAX_DAMP_RETRIES
) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = frac · mean(diag H)``.

    If ``H + λI`` is not numerically positive definite, ``λ`` grows ×10 per retry (each
    logged); after ``max_retries`` a NumericsError says what to change. One host sync per
    attempt, never per column.
    """
    # A real Hessian has a positive diagonal once dead columns are patched; the clamp keeps
    # damping positive for anything else so the retries can only help.
    damp = dampening_frac * torch.diagonal(h).mean().clamp_min(1e-8)
    # ``h`` is the caller's private copy: damped in place, and at most two more [in, in]
    # matrices are alive at once (the 14336-wide down_proj Hessian is 0.8 GB in float32).
    h.diagonal().add_(damp)
    for attempt in range(max_retries + 1):
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = _cholesky_inverse(low)
            del low
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
        if attempt < max_retries:
            log.warning(
                "GPTQ %s: Hessian not positive definite with dampening %.3g x mean(diag); "
                "retrying with 10x more dampening",
                name,
                dampening_frac * 10**attempt,
            )
            h.diagonal().add_(damp * 9)
            damp = damp * 10
    raise NumericsError(
        f"GPTQ {name}: Cholesky of the Hessian failed even with dampening_frac "
        f"{dampening_frac * 10**max_retries:.3g}", file=name, value=dampening_frac * 10**max_retries,
        hint="check the calibration activations for NaN/Inf or use more calibration samples")


def _cholesky_inverse(low: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹`` from ``L``. On CPU by solving against I: torch's CPU ``cholesky_inverse``
    takes 11 s for a 1536-wide factor, 60x longer than the solve. On CUDA ``cholesky_inverse``
    is fast and needs no [in, in] identity beside the result (3.3 GB at 28672 wide)."""
    if low.device.type == "cpu":
        return torch.cholesky_solve(torch.eye(low.shape[0], dtype=low.dtype), low)
    return torch.cholesky_inverse(low)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    name: str = "weight",
    global_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize ``w`` ``[out, in]`` given the Hessian ``[in, in]`` of its inputs.

    Runs on ``w``'s device in float32. With ``act_order`` columns are visited by decreasing
    Hessian diagonal; for dynamic groups the result then carries ``g_idx`` (groups are runs
    of that visiting order). With ``static_groups`` the group parameters are fixed from the
    unpermuted weight before any update, so groups stay in natural order and ``g_idx`` is
    None. Channel and tensor strategies fix their parameters up front, as the reference does.
    With ``clip_search`` those up-front parameters come from each group's range shrunk to
    minimise its RTN error under the Hessian's diagonal block (``clip_to_gram``) instead of
    the min-max range, for per-channel and per-group scales; dynamic groups take no search
    (their weights move under the updates), nor do block, tensor and global-scale layouts.
    A tensor_group scheme uses ``global_scale`` (shared with fused shards) or the weight's own.
    """
    ws: WeightScheme = scheme.weights
    out_f, in_f = w.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in_features {in_f}")
    group = column_group_width(ws, in_f)
    if group is not None and ws.strategy != "block" and in_f % group:
        raise ValueError(f"{name}: in_features {in_f} is not a multiple of group_size {group}")
    dynamic_groups = group is not None and not static_groups
    if dynamic_groups and act_order and ws.layout.kind != "group":
        raise ValueError(f"{name}: act-order with {ws.strategy} scales needs static groups")
    device = w.device

    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise NumericsError(f"GPTQ {name}: the Hessian has NaN/Inf", file=name,
                            hint="the calibration activations are not finite")
    # Columns whose input was always zero: their weight cannot matter, so zero it and give
    # the Hessian a unit diagonal there (reference behaviour).
    dead = torch.diagonal(H) == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(0), 0.0)
    if ws.has_global_scale and global_scale is None:
        global_scale = weight_global_scale([W], ws)
    if global_scale is not None:
        global_scale = global_scale.to(device=device, dtype=torch.float32)

    # Per-column parameters fixed before the loop (natural order), when not dynamic groups.
    col_scale = col_zero = None
    if not dynamic_groups:
        ranged = W
        if clip_search and ws.strategy in ("channel", "group"):
            ranged = clip_to_gram(W, group_grams(H, group or in_f), scheme)
        scale, zero = weight_qparams(ranged, ws, global_scale)
        del ranged
        col_scale = ws.layout.expand(effective_scale(scale, global_scale), out_f, in_f)
        col_zero = None if zero is None else ws.layout.expand(zero, out_f, in_f)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if col_scale is not None:
            col_scale = col_scale[:, perm]
            col_zero = None if col_zero is None else col_zero[:, perm]

    Hinv = _inverse_hessian_factor(H, dampening_frac, name)
    del H

    bs = max(1, block_size)
    if dynamic_groups:
        bs = max(group, (bs // group) * group)
    codes = torch.empty(out_f, in_f, dtype=ws.grid.code_dtype, device=device)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []
    col_zero_f = None if col_zero is None else col_zero.to(torch.float32)
    asym = not ws.symmetric
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        n = i2 - i1
        S = None if dynamic_groups else col_scale[:, i1:i2]
        Z = None if dynamic_groups or col_zero_f is None else col_zero_f[:, i1:i2]
        graph = (_block_graph(out_f, n, device, dynamic_groups, asym, ws, group, global_scale)
                 if n == bs else None)
        if graph is not None:
            C1, Err1, GS, GZ = graph.run(W[:, i1:i2], Hinv[i1:i2, i1:i2], S, Z, global_scale)
        else:
            # a view: W's columns before i2 are never read again
            W1 = W[:, i1:i2]
            C1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
            GS = GZ = None
            if dynamic_groups:
                GS = torch.empty(out_f, math.ceil(n / group), device=device)
                GZ = torch.empty(out_f, math.ceil(n / group), device=device, dtype=torch.int8) if asym else None
            _quantize_block(W1, Hinv[i1:i2, i1:i2], C1, Err1, S, Z, GS, GZ, ws, group, global_scale)
        codes[:, i1:i2] = C1.to(codes.dtype)
        if GS is not None:
            group_scales.append(GS.clone())
            if GZ is not None:
                group_zeros.append(GZ.clone())
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if dynamic_groups:
            g_idx = (torch.arange(in_f, device=device) // group)[invperm].to(torch.int32)

    if dynamic_groups:
        scale = torch.cat(group_scales, dim=1)
        zero = torch.cat(group_zeros, dim=1) if group_zeros else None
        if ws.strategy == "block":  # column groups held each row's block scale: one row per block
            scale = scale[:: ws.block_size[0]].contiguous()
    if not bool(torch.isfinite(scale).all()):
        raise NumericsError(f"GPTQ {name}: non-finite scales", file=name, hint="the weight has NaN/Inf")
    actorder = "group" if g_idx is not None else "static" if act_order and group is not None else None
    out_scheme = scheme
    if ws.actorder != actorder:
        out_scheme = Scheme(replace(ws, actorder=actorder), scheme.input_activations)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, scheme=out_scheme, g_idx=g_idx,
                           global_scale=global_scale)


def column_group_width(ws: WeightScheme, in_features: int) -> int | None:
    """Columns that share one scale per row (or row block), or None when parameters span
    the whole row or tensor."""
    if ws.strategy in ("group", "tensor_group"):
        return ws.group_size or in_features
    if ws.strategy == "block":
        return ws.block_size[1]
    return None


def column_group_qparams(cols: torch.Tensor, ws: WeightScheme, global_scale: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored scale and zero point (or None) of one column group ``[rows, k]``, one value
    per row: the scheme's layout restricted to these columns (a block scheme's row blocks
    share one), with its scale format and global scale."""
    rows, k = cols.shape
    one = replace(ws, block_size=(ws.block_size[0], k)) if ws.strategy == "block" else replace(ws, group_size=k)
    scale, zero = weight_qparams(cols, one, global_scale)
    scale = one.layout.expand(scale, rows, k)[:, 0]
    return scale, None if zero is None else one.layout.expand(zero, rows, k)[:, 0]


def _quantize_block(W1, Hinv1, C1, Err1, S, Z, GS, GZ, ws: WeightScheme, group: int | None,
                    global_scale: torch.Tensor | None = None) -> None:
    """GPTQ's sequential loop over one block's columns, in place.

    ``W1`` ``[rows, n]`` is updated as columns are quantized; ``C1`` gets the codes (as floats),
    ``Err1`` the scaled errors the caller pushes onto later blocks. Per-column effective
    scale/zero come from ``S``/``Z`` (float), or, when ``S`` is None (dynamic groups; the block
    is whole groups), from each group's up-to-date weights, written (as stored) to ``GS``/``GZ``.
    Few in-place ops per column and no host sync: on a GPU this loop is launch-bound, and it
    is captured as a CUDA graph.
    """
    grid = ws.grid
    for i in range(W1.shape[1]):
        if S is None:
            if i % group == 0:
                sg, zg = column_group_qparams(W1[:, i : i + group], ws, global_scale)
                GS[:, i // group] = sg
                s = effective_scale(GS[:, i // group], global_scale)
                z = None
                if zg is not None:
                    GZ[:, i // group] = zg
                    z = zg.to(torch.float32)
        else:
            s = S[:, i]
            z = None if Z is None else Z[:, i]
        w = W1[:, i]
        c = C1[:, i]
        torch.div(w, s, out=c)
        if z is not None:
            c.add_(z)
        if grid.type == "int":
            c.round_().clamp_(grid.qmin, grid.qmax)
        else:
            c.copy_(round_to_grid(c, grid))
        q = c - z if z is not None else c.clone()
        q.mul_(s)
        err = Err1[:, i]
        torch.sub(w, q, out=err)
        err.div_(Hinv1[i, i])
        # addmm_ with an inner dimension of 1, not addr_: the same outer product, but CPU addr_
        # is ~100x slower (a naive kernel, not BLAS).
        W1[:, i:].addmm_(err.unsqueeze(1), Hinv1[i, i:].unsqueeze(0), alpha=-1.0)


class _BlockGraph:
    """``_quantize_block`` captured once as a CUDA graph over static buffers, then replayed
    per block: one launch instead of about ten kernel launches per column."""

    def __init__(self, rows: int, n: int, device: torch.device, dynamic: bool, asym: bool,
                 ws: WeightScheme, group: int | None, global_scale: torch.Tensor | None):
        f32 = dict(device=device, dtype=torch.float32)
        self.W1, self.Hinv1 = torch.zeros(rows, n, **f32), torch.eye(n, **f32)
        self.C1, self.Err1 = torch.zeros(rows, n, **f32), torch.zeros(rows, n, **f32)
        self.S = None if dynamic else torch.ones(rows, n, **f32)
        self.Z = torch.zeros(rows, n, **f32) if asym and not dynamic else None
        self.GS = torch.ones(rows, math.ceil(n / group), **f32) if dynamic else None
        self.GZ = (torch.zeros(rows, math.ceil(n / group), device=device, dtype=torch.int8)
                   if dynamic and asym else None)
        # the global scale is the weight's: a replay for another weight copies it in
        self.global_scale = None if global_scale is None else global_scale.clone()
        args = (self.W1, self.Hinv1, self.C1, self.Err1, self.S, self.Z, self.GS, self.GZ, ws, group,
                self.global_scale)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            _quantize_block(*args)  # warm-up outside the capture, as CUDA graphs require
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _quantize_block(*args)

    def run(self, W1, Hinv1, S, Z, global_scale=None):
        self.W1.copy_(W1)
        if global_scale is not None:
            self.global_scale.copy_(global_scale)
        self.Hinv1.copy_(Hinv1)
        if S is not None:
            self.S.copy_(S)
        if Z is not None:
            self.Z.copy_(Z)
        self.graph.replay()
        return self.C1, self.Err1, self.GS, self.GZ


_GRAPHS: dict[tuple, _BlockGraph | None] = {}
_MAX_GRAPHS = 8


def _block_graph(rows: int, n: int, device: torch.device, dynamic: bool, asym: bool, ws: WeightScheme,
                 group: int | None, global_scale: torch.Tensor | None) -> _BlockGraph | None:
    """The cached graph for this block shape, or None (CPU, disabled, or capture failed: the
    eager loop computes the same thing). Set QUANTKIT_CUDA_GRAPHS=0 to disable."""
    if device.type != "cuda" or os.environ.get("QUANTKIT_CUDA_GRAPHS", "1") == "0":
        return None
    key = (rows, n, str(device), dynamic, asym, ws, group, global_scale is None)
    if key not in _GRAPHS:
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        try:
            _GRAPHS[key] = _BlockGraph(rows, n, device, dynamic, asym, ws, group, global_scale)
        except RuntimeError as e:  # capture unsupported here: fall back to the eager loop
            log.warning("GPTQ: CUDA graph capture failed (%s); using the eager column loop", e)
            _GRAPHS[key] = None
    return _GRAPHS[key]


def feedback_target(w: torch.Tensor, h_quant: torch.Tensor, cross: torch.Tensor, dampening_frac: float,
                    name: str = "weight") -> torch.Tensor:
    """The float weight GPTQ should approximate when its inputs are the quantized model's
    ``X̃`` but its target is the float layer's output on the float inputs ``X`` (GPTAQ's
    objective): ``min ||X Wᵀ − X̃ Ŵᵀ||² = ||X̃ (W* − Ŵ)ᵀ||² + const`` with
    ``W* = W + W (Cᵀ − H̃)(H̃ + λI)⁻¹``, ``H̃ = X̃ᵀX̃`` and ``C = X̃ᵀX`` on the same scale.

    The damping ``λ = frac · mean(diag H̃)`` pulls ``W*`` toward ``W`` (not toward zero): with
    ``X̃ = X`` it is ``W`` exactly, and directions the calibration tokens barely excite are
    left alone instead of fitted to noise.
    """
    h = h_quant.detach().to(torch.float64).clone()
    h.diagonal().add_(dampening_frac * torch.diagonal(h).mean().clamp_min(1e-8))
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise NumericsError(f"GPTQ {name}: the quantized-input Hessian is not positive definite even damped; "
                            "use more calibration samples or a larger dampening_frac")
    w64 = w.detach().to(torch.float64)
    rhs = (cross.to(torch.float64) - h_quant.to(torch.float64)) @ w64.T  # [in, out]
    return (w64 + torch.cholesky_solve(rhs, low).T).to(torch.float32)


class GPTQParams(SchemeParams):
    """GPTQ: weight-only int (W4A16 / W8A16) by bits/group_size/symmetric, or any preset.

    Act-order with static groups is the default: visiting columns by decreasing Hessian
    diagonal is most of GPTQ's gain over RTN at 4 bits (docs/quality.md), and with static
    groups the checkpoint needs no ``g_idx``, which is vLLM's fastest path and storable in
    every format."""

    method: Literal["gptq"] = "gptq"
    bits: Literal[4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    symmetric: bool = True
    act_order: bool = True
    static_groups: bool = True
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1, description="columns whose updates are applied together (lazy batch)")
    input_feedback: bool = Field(False, description="fit the quantized layer on its quantized inputs to the float "
                                 "layer's output on float inputs (GPTAQ's objective); keeps a second calibration "
                                 "stream")
    clip_search: bool = Field(False, description="shrink each group's range where that lowers its Hessian-weighted "
                              "error before the column loop (static groups or per channel)")

    @model_validator(mode="after")
    def _clip_needs_fixed_scales(self) -> "GPTQParams":
        if self.clip_search and self.group_size != -1 and not self.static_groups:
            raise ValueError("clip_search chooses group scales before the column loop: set static_groups: true "
                             "(or group_size: -1)")
        return self

    def int_scheme(self, bits: int, group_size: int, symmetric: bool) -> Scheme:
        return weight_only_scheme(bits, group_size, symmetric)

    def finish(self, scheme: Scheme) -> Scheme:
        """Record act-order on group layouts: "static" (groups fixed first, contiguous) or
        "group" (groups follow the visiting order; needs a g_idx)."""
        ws = scheme.weights
        if not self.act_order or column_group_width(ws, 0) is None:
            return scheme
        return Scheme(replace(ws, actorder="static" if self.static_groups else "group"), scheme.input_activations)


def collect_hessians(graph, stats: dict | None = None, names=None) -> tuple[dict[str, HessianAccumulator], dict]:
    """One Hessian accumulator per input group, keyed by every Linear of the group, and the
    statistics to observe (merged into ``stats``): only the group's first Linear is observed.
    With ``names``, only groups holding one of them."""
    stats = dict(stats or {})
    accs: dict[str, HessianAccumulator] = {}
    for g in graph.groups:
        if names is not None and not set(g.linears) & set(names):
            continue
        acc = HessianAccumulator(g.key, graph.unit(g.key).in_features)
        for n in g.linears:
            accs[n] = acc
        stats[g.key] = acc if g.key not in stats else Joined(stats[g.key], acc)
    return accs, stats


class _PairedHessians:
    """One input group's statistics on both streams: the Hessian of the quantized-stream
    inputs, the cross term with the float-stream inputs, and ``also`` (an input global
    scale's range) watching the quantized stream, the one the served model computes on."""

    def __init__(self, acc: HessianAccumulator, cross: HessianAccumulator, also=None) -> None:
        self.acc, self.cross, self.also = acc, cross, also

    def add(self, xq: torch.Tensor, xf: torch.Tensor) -> None:
        self.acc.add(xq)
        self.cross.add(xq, xf)
        if self.also is not None:
            self.also.add(xq)

    def reduce(self, world: World) -> None:
        for s in (self.acc, self.cross, self.also):
            if s is not None:
                s.reduce(world)


def collect_paired_hessians(
    graph, stats: Mapping | None = None, names=None
) -> tuple[dict[str, HessianAccumulator], dict[str, HessianAccumulator], dict[str, _PairedHessians]]:
    """Per input group: the Hessian of the quantized-stream inputs ``X̃ᵀX̃`` and the cross
    term ``X̃ᵀX`` with the float-stream inputs, keyed by every Linear of the group, and the
    paired statistics that feed them (``stats``, one input each, folded in on the quantized
    stream); with ``names``, only groups holding one of them."""
    stats = dict(stats or {})
    accs: dict[str, HessianAccumulator] = {}
    crosses: dict[str, HessianAccumulator] = {}
    paired = {}
    for g in graph.groups:
        if names is not None and not set(g.linears) & set(names):
            continue
        width = graph.unit(g.key).in_features
        acc, cross = HessianAccumulator(g.key, width), HessianAccumulator(g.key, width)
        for n in g.linears:
            accs[n], crosses[n] = acc, cross
        paired[g.key] = _PairedHessians(acc, cross, stats.pop(g.key, None))
    return accs, crosses, paired


@dataclass(frozen=True)
class SolvePart:
    """One GPTQ solve: Linears sharing a Hessian, a scheme and a global scale, stacked by rows
    (``stacked``) or solved one by one, and its estimated cost for the owner assignment."""

    names: tuple[str, ...]
    scheme: Scheme
    stacked: bool
    cost: float

    @property
    def key(self) -> str:
        return "+".join(self.names)


def solve_parts(layer, graph, accs: Mapping[str, HessianAccumulator], schemes: Mapping[str, Scheme],
                world: World = SINGLE) -> list[SolvePart]:
    """The solves of ``gptq_layer``, known before any statistic (shapes, schemes, which Linears
    share a Hessian and a global scale), so Hessians can be reduced to where they are solved.

    Linears that share a Hessian and a scheme (q/k/v; gate/up) are solved as one weight with
    their rows stacked: GPTQ treats rows independently given ``H`` (scales are per row, row
    group or row block, and the error update of a row reads only that row), so this is the
    same computation with one Cholesky factorisation and one sequential column loop instead
    of three or two. A stack is cut into row chunks of at most ``MAX_STACKED_ELEMENTS``, and
    a stack of experts (a MoE layer's gate/up all share one Hessian) into at least one part per
    rank: experts are units of the owner assignment."""
    globals_ = fused_global_scales(layer, graph, schemes)
    # One stack per Hessian, scheme and global scale (a MoE layer's experts share a Hessian
    # but each fused gate/up pair has its own global scale).
    by_key: dict[tuple[int, Scheme, int], list[str]] = {}
    for name, scheme in schemes.items():
        by_key.setdefault((id(accs[name]), scheme, id(globals_.get(name))), []).append(name)
    parts = []
    for (_, scheme, _), names in by_key.items():
        units = [graph.unit(n) for n in names]
        stacked = _stackable(scheme.weights, [u.out_features for u in units])
        sizes = [u.out_features * u.in_features for u in units]
        cap = MAX_STACKED_ELEMENTS
        if world.size > 1 and all(expert_of(n) is not None for n in names):
            cap = min(cap, -(-sum(sizes) // world.size))
        in_f = units[0].in_features
        for part in _row_chunks(names, sizes, cap) if stacked else [[n] for n in names]:
            rows = sum(graph.unit(n).out_features for n in part)
            # The column loop touches rows x in^2 / 2 elements, the factorisations about in^3.
            parts.append(SolvePart(tuple(part), scheme, stacked, float(in_f) * in_f * (rows + in_f)))
    return parts


def hessians_to_owners(parts: list[SolvePart], world: World, *accs: Mapping[str, HessianAccumulator]) -> None:
    """Give each Hessian that only one rank's solves read that rank as its ``owner``: it is
    reduced to that rank alone and the others drop it (an expert's Hessian lives on one GPU,
    and the traffic is a reduce instead of an all-reduce). Hessians several ranks' solves
    read (a MoE layer's shared gate/up one, cut into parts) are all-reduced."""
    owner = world.owners({p.key: p.cost for p in parts})
    for group in accs:
        readers: dict[int, set[int]] = {}
        for p in parts:
            for n in p.names:
                readers.setdefault(id(group[n]), set()).add(owner[p.key])
        for acc in {id(a): a for a in group.values()}.values():
            ranks = readers.get(id(acc), set())
            acc.owner = next(iter(ranks)) if len(ranks) == 1 else None


def gptq_layer(
    layer, graph, accs: dict[str, HessianAccumulator], schemes: Scheme | Mapping[str, Scheme],
    world: World = SINGLE, target: Callable[[str], torch.Tensor] | None = None,
    parts: list[SolvePart] | None = None, **kwargs
) -> dict[str, QuantizedWeight]:
    """GPTQ the units of ``schemes`` (or every unit of ``graph`` with one scheme) with the
    Hessians already accumulated (and reduced) in ``accs``, each of ``parts`` (``solve_parts``)
    solved on its owner rank of ``world``. Linears stacked in one solve share one global
    scale (tensor_group), as vLLM needs for the matrix it fuses them into; it is taken from
    the layer's own weights. ``target(name)`` is what GPTQ approximates for a unit: its
    weight, or ``feedback_target``.
    """
    if isinstance(schemes, Scheme):
        schemes = {n: schemes for n in graph.linears}
    target = target or (lambda n: graph.unit(n).matrix(layer).detach())
    globals_ = fused_global_scales(layer, graph, schemes)  # from the weights alone: the same on every rank
    parts = parts if parts is not None else solve_parts(layer, graph, accs, schemes, world)

    def solve(part: SolvePart) -> dict[str, QuantizedWeight]:
        names = list(part.names)
        weights = [target(n) for n in names]
        hessian = accs[names[0]].hessian()
        shared = globals_.get(names[0])
        if not part.stacked:
            return {n: gptq_quantize(w, hessian, part.scheme, name=n, global_scale=shared, **kwargs)
                    for n, w in zip(names, weights)}
        qw = gptq_quantize(torch.cat(weights), hessian, part.scheme, name=part.key, global_scale=shared, **kwargs)
        return split_rows(qw, names, [w.shape[0] for w in weights])

    return solve_units(world, {p.key: (p.cost, lambda p=p: solve(p)) for p in parts})


# Weights stacked into one GPTQ solve hold at most this many elements (1 GiB in float32, as
# the solve works): every expert of a MoE layer shares one gate/up Hessian, and DeepSeek-V3's
# 512 expert matrices stacked at once would take 30 GB in float32 beside the layer.
MAX_STACKED_ELEMENTS = 1 << 28


def _row_chunks(names: list[str], sizes: list[int], cap: int | None = None) -> list[list[str]]:
    """``names`` in consecutive runs whose weights hold at most ``cap`` elements
    (``MAX_STACKED_ELEMENTS``; one name per run when a single weight is larger)."""
    cap = MAX_STACKED_ELEMENTS if cap is None else cap
    runs: list[list[str]] = [[]]
    total = 0
    for n, size in zip(names, sizes):
        if runs[-1] and total + size > cap:
            runs.append([])
            total = 0
        runs[-1].append(n)
        total += size
    return runs


def _stackable(ws: WeightScheme, rows: list[int]) -> bool:
    """Row stacking keeps every scale inside one weight: not for one tensor scale per weight,
    nor for row blocks that would straddle two weights."""
    if len(rows) == 1 or ws.strategy == "tensor":
        return False
    return ws.strategy != "block" or all(r % ws.block_size[0] == 0 for r in rows[:-1])


def split_rows(qw: QuantizedWeight, names: list[str], rows: list[int]) -> dict[str, QuantizedWeight]:
    """Undo the row stacking of ``gptq_layer``: per-row tensors split (scales by the layout),
    ``g_idx`` and the global scale shared."""
    layout = qw.scheme.weights.layout

    def parts(t, by_layout=False):
        if t is None:
            return [None] * len(rows)
        return [p.contiguous() for p in (layout.split_rows(t, rows) if by_layout else torch.split(t, rows))]

    def copy(t):
        return None if t is None else t.clone()

    return {
        n: QuantizedWeight(codes=c, scale=s, zero_point=z, scheme=qw.scheme, g_idx=copy(qw.g_idx),
                           input_scale=qw.input_scale, global_scale=copy(qw.global_scale))
        for n, c, s, z in zip(names, parts(qw.codes), parts(qw.scale, True), parts(qw.zero_point, True))
    }


@register_quantizer("gptq")
class GPTQQuantizer(Quantizer):
    Params = GPTQParams

    def __init__(self, params: GPTQParams, model_config: dict) -> None:
        super().__init__(params, model_config)
        self.needs_float_inputs = params.input_feedback

    def quantize_layer(self, layer, graph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        p: GPTQParams = self.params  # type: ignore[assignment]
        schemes = self.schemes_or_default(graph, schemes)
        input_globals = observe_input_globals(graph, schemes)
        target = None
        if p.input_feedback:
            accs, crosses, paired = collect_paired_hessians(graph, input_globals.stats, names=schemes)
            parts = solve_parts(layer, graph, accs, schemes, calib.world)
            hessians_to_owners(parts, calib.world, accs, crosses)
            calib.observe_paired(paired)

            def target(n: str) -> torch.Tensor:  # on the unit's owner rank, within its solve
                return feedback_target(graph.unit(n).matrix(layer), accs[n].hessian(), crosses[n].hessian(),
                                       p.dampening_frac, n)
        else:
            accs, stats = collect_hessians(graph, input_globals.stats, names=schemes)
            parts = solve_parts(layer, graph, accs, schemes, calib.world)
            hessians_to_owners(parts, calib.world, accs)
            calib.observe(stats)
        out = gptq_layer(
            layer,
            graph,
            accs,
            schemes,
            calib.world,
            target,
            parts,
            block_size=p.block_size,
            dampening_frac=p.dampening_frac,
            act_order=p.act_order,
            static_groups=p.static_groups,
            clip_search=p.clip_search,
        )
        input_globals.apply(out)
        return out
