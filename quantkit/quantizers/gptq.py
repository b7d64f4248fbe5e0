"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian.

Follows the IST-DASLab reference (``gptq.py``): dead columns, dampening, the upper Cholesky
factor of ``H⁻¹``, and lazy block updates. Two deliberate differences, both documented
where they happen: a failed Cholesky is retried with more damping instead of crashing, and
with dynamic groups the block size is a multiple of the group size so each group's scale
is taken from its fully error-updated weights (the reference reads stale columns when the
group is smaller than the block).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from ..errors import NumericsError
from ..scheme import QuantizedWeight, Scheme, WeightScheme
from ..distributed import World
from .base import Joined, LayerCalibration, Quantizer, QuantizerParams, register_quantizer, solve_units
from .hessian import HessianAccumulator
from .rtn import qparams, weight_only_scheme, weight_qparams

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
    name: str = "weight",
) -> QuantizedWeight:
    """GPTQ-quantize ``w`` ``[out, in]`` given the Hessian ``[in, in]`` of its inputs.

    Runs on ``w``'s device in float32. With ``act_order`` columns are visited by decreasing
    Hessian diagonal; for dynamic groups the result then carries ``g_idx`` (groups are runs
    of that visiting order). With ``static_groups`` the group parameters are fixed from the
    unpermuted weight before any update, so groups stay in natural order and ``g_idx`` is
    None. Channel and tensor strategies fix their parameters up front, as the reference does.
    """
    ws: WeightScheme = scheme.weights
    if ws.type != "int":
        raise ValueError("GPTQ quantizes to integer codes; use the fp8 quantizer for float codes")
    out_f, in_f = w.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in_features {in_f}")
    group = (ws.group_size or in_f) if ws.strategy == "group" else None
    if group is not None and in_f % group:
        raise ValueError(f"{name}: in_features {in_f} is not a multiple of group_size {group}")
    dynamic_groups = group is not None and not static_groups
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

    # Per-column parameters fixed before the loop (natural order), when not dynamic groups.
    col_scale = col_zero = None
    if not dynamic_groups:
        scale, zero = weight_qparams(W, ws)
        if group is not None:
            col_scale = scale.repeat_interleave(group, dim=1)
            col_zero = None if zero is None else zero.repeat_interleave(group, dim=1)
        else:
            col_scale = scale.reshape(-1, 1).expand(out_f, in_f)
            col_zero = None if zero is None else zero.reshape(-1, 1).expand(out_f, in_f)

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
    codes = torch.empty(out_f, in_f, dtype=torch.int8, device=device)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []
    col_zero_f = None if col_zero is None else col_zero.to(torch.float32)
    asym = not ws.symmetric
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        n = i2 - i1
        S = None if dynamic_groups else col_scale[:, i1:i2]
        Z = None if dynamic_groups or col_zero_f is None else col_zero_f[:, i1:i2]
        graph = _block_graph(out_f, n, device, dynamic_groups, asym, ws, group) if n == bs else None
        if graph is not None:
            C1, Err1, GS, GZ = graph.run(W[:, i1:i2], Hinv[i1:i2, i1:i2], S, Z)
        else:
            # a view: W's columns before i2 are never read again
            W1 = W[:, i1:i2]
            C1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
            GS = GZ = None
            if dynamic_groups:
                GS = torch.empty(out_f, n // group, device=device)
                GZ = torch.empty(out_f, n // group, device=device, dtype=torch.int8) if asym else None
            _quantize_block(W1, Hinv[i1:i2, i1:i2], C1, Err1, S, Z, GS, GZ, ws, group)
        codes[:, i1:i2] = C1.to(torch.int8)
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
    if not bool(torch.isfinite(scale).all()):
        raise NumericsError(f"GPTQ {name}: non-finite scales", file=name, hint="the weight has NaN/Inf")
    actorder = "group" if g_idx is not None else "static" if act_order and ws.strategy == "group" else None
    out_scheme = scheme
    if ws.actorder != actorder:
        out_scheme = Scheme(replace(ws, actorder=actorder), scheme.input_activations)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, scheme=out_scheme, g_idx=g_idx)


def _quantize_block(W1, Hinv1, C1, Err1, S, Z, GS, GZ, ws: WeightScheme, group: int | None) -> None:
    """GPTQ's sequential loop over one block's columns, in place.

    ``W1`` ``[rows, n]`` is updated as columns are quantized; ``C1`` gets the codes (as floats),
    ``Err1`` the scaled errors the caller pushes onto later blocks. Per-column scale/zero come
    from ``S``/``Z`` (float), or, when ``S`` is None (dynamic groups; the block is whole groups),
    from each group's up-to-date weights, written to ``GS``/``GZ``. Few in-place ops per column
    and no host sync: on a GPU this loop is launch-bound, and it is captured as a CUDA graph.
    """
    for i in range(W1.shape[1]):
        if S is None:
            if i % group == 0:
                sg, zg = qparams(W1[:, i : i + group], ws)
                GS[:, i // group] = sg[:, 0]
                s = GS[:, i // group]
                z = None
                if zg is not None:
                    GZ[:, i // group] = zg[:, 0]
                    z = zg[:, 0].to(torch.float32)
        else:
            s = S[:, i]
            z = None if Z is None else Z[:, i]
        w = W1[:, i]
        c = C1[:, i]
        torch.div(w, s, out=c)
        if z is not None:
            c.add_(z)
        c.round_().clamp_(ws.qmin, ws.qmax)
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
                 ws: WeightScheme, group: int | None):
        f32 = dict(device=device, dtype=torch.float32)
        self.W1, self.Hinv1 = torch.zeros(rows, n, **f32), torch.eye(n, **f32)
        self.C1, self.Err1 = torch.zeros(rows, n, **f32), torch.zeros(rows, n, **f32)
        self.S = None if dynamic else torch.ones(rows, n, **f32)
        self.Z = torch.zeros(rows, n, **f32) if asym and not dynamic else None
        self.GS = torch.ones(rows, n // group, **f32) if dynamic else None
        self.GZ = torch.zeros(rows, n // group, device=device, dtype=torch.int8) if dynamic and asym else None
        args = (self.W1, self.Hinv1, self.C1, self.Err1, self.S, self.Z, self.GS, self.GZ, ws, group)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            _quantize_block(*args)  # warm-up outside the capture, as CUDA graphs require
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _quantize_block(*args)

    def run(self, W1, Hinv1, S, Z):
        self.W1.copy_(W1)
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
                 group: int | None) -> _BlockGraph | None:
    """The cached graph for this block shape, or None (CPU, disabled, or capture failed: the
    eager loop computes the same thing). Set QUANTKIT_CUDA_GRAPHS=0 to disable."""
    if device.type != "cuda" or os.environ.get("QUANTKIT_CUDA_GRAPHS", "1") == "0":
        return None
    key = (rows, n, str(device), dynamic, asym, ws, group)
    if key not in _GRAPHS:
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        try:
            _GRAPHS[key] = _BlockGraph(rows, n, device, dynamic, asym, ws, group)
        except RuntimeError as e:  # capture unsupported here: fall back to the eager loop
            log.warning("GPTQ: CUDA graph capture failed (%s); using the eager column loop", e)
            _GRAPHS[key] = None
    return _GRAPHS[key]


class GPTQParams(QuantizerParams):
    """GPTQ weight-only quantization (W4A16 / W8A16)."""

    method: Literal["gptq"] = "gptq"
    bits: Literal[4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    symmetric: bool = True
    act_order: bool = False
    static_groups: bool = False
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)

    def scheme(self) -> Scheme:
        actorder = ("static" if self.static_groups else "group") if self.act_order else None
        return weight_only_scheme(self.bits, self.group_size, self.symmetric, actorder)


def collect_hessians(graph, stats: dict | None = None) -> tuple[dict[str, HessianAccumulator], dict]:
    """One Hessian accumulator per input group, keyed by every Linear of the group, and the
    statistics to observe (merged into ``stats``): only the group's first Linear is hooked."""
    stats = dict(stats or {})
    accs: dict[str, HessianAccumulator] = {}
    for g in graph.groups:
        acc = HessianAccumulator(g.key, graph.unit(g.key).in_features)
        for n in g.linears:
            accs[n] = acc
        stats[g.key] = acc if g.key not in stats else Joined(stats[g.key], acc)
    return accs, stats


def gptq_layer(
    layer, graph, accs: dict[str, HessianAccumulator], scheme: Scheme, world: World, **kwargs
) -> dict[str, QuantizedWeight]:
    """GPTQ every unit of ``graph`` with the Hessians already accumulated (and reduced) in
    ``accs``, each solve on its owner rank of ``world``.

    Linears that share a Hessian (q/k/v; gate/up) are solved as one weight with their rows
    stacked: GPTQ treats rows independently given ``H`` (scales are per row or per row-group,
    and the error update of a row reads only that row), so this is the same computation with
    one Cholesky factorisation and one sequential column loop instead of three or two.
    """
    by_acc: dict[int, list[str]] = {}
    for name in graph.linears:
        by_acc.setdefault(id(accs[name]), []).append(name)

    def solve(names: list[str]) -> dict[str, QuantizedWeight]:
        weights = [graph.unit(n).matrix(layer).detach() for n in names]
        hessian = accs[names[0]].hessian()
        if len(names) == 1 or scheme.weights.strategy == "tensor":  # a tensor scale spans one weight
            return {n: gptq_quantize(w, hessian, scheme, name=n, **kwargs) for n, w in zip(names, weights)}
        stacked = gptq_quantize(torch.cat(weights), hessian, scheme, name="+".join(names), **kwargs)
        return split_rows(stacked, names, [w.shape[0] for w in weights])

    jobs = {}
    for names in by_acc.values():
        units = [graph.unit(n) for n in names]
        in_f, rows = units[0].in_features, sum(u.out_features for u in units)
        # The column loop touches rows x in^2 / 2 elements, the factorisations about in^3.
        jobs["+".join(names)] = (float(in_f) * in_f * (rows + in_f), lambda names=names: solve(names))
    return solve_units(world, jobs)


def split_rows(qw: QuantizedWeight, names: list[str], rows: list[int]) -> dict[str, QuantizedWeight]:
    """Undo the row stacking of ``gptq_layer``: per-row tensors split, ``g_idx`` shared."""
    def parts(t):
        return [None] * len(rows) if t is None else [p.contiguous() for p in torch.split(t, rows)]

    return {
        n: QuantizedWeight(codes=c, scale=s, zero_point=z, scheme=qw.scheme,
                           g_idx=None if qw.g_idx is None else qw.g_idx.clone(), input_scale=qw.input_scale)
        for n, c, s, z in zip(names, parts(qw.codes), parts(qw.scale), parts(qw.zero_point))
    }


@register_quantizer("gptq")
class GPTQQuantizer(Quantizer):
    Params = GPTQParams

    def quantize_layer(self, layer, graph, calib: LayerCalibration) -> dict[str, QuantizedWeight]:
        p: GPTQParams = self.params  # type: ignore[assignment]
        accs, stats = collect_hessians(graph)
        calib.observe(stats)
        return gptq_layer(
            layer,
            graph,
            accs,
            self.scheme,
            calib.world,
            block_size=p.block_size,
            dampening_frac=p.dampening_frac,
            act_order=p.act_order,
            static_groups=p.static_groups,
        )
