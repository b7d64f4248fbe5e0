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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, NamedTuple, TypedDict

import torch
from pydantic import Field, model_validator

from ..errors import NumericsError
from ..grids import effective_scale, round_to_grid
from ..scheme import QuantizedWeight, Scheme, WeightScheme
from ..distributed import SINGLE, World
from ..graph.experts import expert_of
from ..graph.stages import sequential_stages
from .activation_params import observe_input_globals
from .base import Joined, LayerCalibration, Quantizer, register_quantizer, solve_units
from . import gptq_block_kernel
from .clip import clip_to_gram, group_grams
from .hessian import HessianAccumulator
from .rtn import fused_global_scales, weight_global_scale, weight_only_scheme, weight_qparams
from .scheme_params import SchemeParams
from .split_product import upper_blocks_product

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11; quantkit supports 3.10

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


def _inverse_hessian_factor(
    h: torch.Tensor, dampening_frac: float, names: Sequence[str], max_retries: int = MAX_DAMP_RETRIES
) -> torch.Tensor:
    """Upper Cholesky factors of ``(H + λI)⁻¹`` for a stack of Hessians ``[E, in, in]``, with
    ``λ = frac · mean(diag H)`` per Hessian (``names`` says whose they are).

    A Hessian whose ``H + λI`` is not numerically positive definite gets ``λ`` ×10 per retry
    (each logged, the others are left as they are); after ``max_retries`` a NumericsError says
    what to change. One host sync per attempt, never per column or per Hessian.
    """
    diag = h.diagonal(dim1=1, dim2=2)
    # A real Hessian has a positive diagonal once dead columns are patched; the clamp keeps
    # damping positive for anything else so the retries can only help.
    damp = dampening_frac * diag.mean(1).clamp_min(1e-8)
    # ``h`` is the caller's private copy: damped in place, and at most two more stacks of
    # [in, in] are alive at once (the 14336-wide down_proj Hessian is 0.8 GB in float32).
    diag.add_(damp.unsqueeze(1))
    for attempt in range(max_retries + 1):
        upper, info = upper_inverse_factor(h)
        bad = (info != 0) | ~torch.isfinite(upper).flatten(1).all(1)
        if not bool(bad.any()):
            return upper
        failed = ", ".join(names[e] for e in bad.nonzero().flatten().tolist())
        if attempt < max_retries:
            log.warning(
                "GPTQ %s: Hessian not positive definite with dampening %.3g x mean(diag); "
                "retrying with 10x more dampening",
                failed,
                dampening_frac * 10**attempt,
            )
            more = torch.where(bad, damp * 9, torch.zeros_like(damp))
            diag.add_(more.unsqueeze(1))
            damp = torch.where(bad, damp * 10, damp)
    raise NumericsError(
        f"GPTQ {failed}: Cholesky of the Hessian failed even with dampening_frac "
        f"{dampening_frac * 10**max_retries:.3g}", file=failed, value=dampening_frac * 10**max_retries,
        hint="check the calibration activations for NaN/Inf or use more calibration samples")


def upper_inverse_factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor ``U`` of ``h⁻¹`` (``h⁻¹ = UᵀU``) of a positive definite
    ``h`` ``[..., n, n]``, and the factorisation's ``info`` (non-zero: not positive definite).

    With ``J`` the reversal of rows and columns, ``J h J = L Lᵀ`` gives ``h = R Rᵀ`` with the
    upper triangular ``R = J L J``, so ``h⁻¹ = (R⁻¹)ᵀ R⁻¹`` and ``U = R⁻¹ = J L⁻¹ J``: one
    factorisation and one triangular inverse, where the reference factors ``h``, inverts it and
    factors the inverse. Mixtral's eight 14336-wide Hessians on an H200: 3.04 s -> 1.18 s
    (``cholesky_inverse`` alone was 1.81 s), the same error against float64. At most two
    stacks besides ``h`` are alive at once (a 14336-wide one is 0.8 GB in float32).

    On a GPU a stack ``[E, n, n]`` at least ``STREAMED_WIDTH`` wide is factored one Hessian at
    a time on a few streams instead (``benchmarks/hessian_factor.py``, H200): cuSOLVER's batched Cholesky
    keeps the device busy for narrow Hessians but not for wide ones, whose one-at-a-time
    factorisations overlap across streams.
    """
    if h.is_cuda and h.dim() == 3 and h.shape[0] > 1 and h.shape[-1] >= STREAMED_WIDTH:
        return _upper_inverse_factor_on_streams(h)
    flipped = h.flip(-2, -1)
    low, info = torch.linalg.cholesky_ex(flipped)
    del flipped
    inverse = torch.empty_like(low)
    lower_inverse_into(low, inverse)
    del low
    return inverse.flip(-2, -1), info


STREAMED_WIDTH = 8192
"""From this width a GPU stack of Hessians is factored one at a time on ``FACTOR_STREAMS``
streams: Mixtral's eight 14336-wide 0.88 s -> 0.55 s, sixteen 8192-wide 0.35 -> 0.28 s; at
sixteen 4096-wide both take 0.06 s, and sixty-four 2048-wide take 0.04 s in one call against
0.07 s one at a time."""

FACTOR_STREAMS = 4


def _upper_inverse_factor_on_streams(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``upper_inverse_factor`` of each Hessian of ``h`` by itself, on ``FACTOR_STREAMS``
    streams in turn; the caller's stream waits for all of them. Each stream's temporaries are
    one Hessian's, so fewer are alive at once than for the whole stack."""
    out = torch.empty_like(h)
    info = torch.empty(h.shape[0], dtype=torch.int32, device=h.device)
    here = torch.cuda.current_stream(h.device)
    streams = [torch.cuda.Stream(h.device) for _ in range(FACTOR_STREAMS)]
    for s in streams:
        s.wait_stream(here)
    for e in range(h.shape[0]):
        with torch.cuda.stream(streams[e % FACTOR_STREAMS]):
            upper, one = upper_inverse_factor(h[e:e + 1])
            out[e] = upper[0]
            info[e] = one[0]
    for s in streams:
        here.wait_stream(s)
    return out, info


TRIANGULAR_BASE = 2048
"""Widest triangle ``lower_inverse_into`` inverts by a triangular solve; wider ones are split."""


def lower_inverse_into(low: torch.Tensor, out: torch.Tensor, base: int = TRIANGULAR_BASE) -> None:
    """``out = low⁻¹`` for lower triangular ``low`` ``[..., n, n]``, by halves:
    ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]`` (LAPACK's blocked ``trtri``). A
    triangular solve against the identity costs ``n³`` multiply-adds in a solve kernel; the
    halves cost less than ``2n³/3`` in matrix products, which run faster: eight 14336-wide
    factors on an H200 0.62 s -> 0.38 s, the same error against float64. Below ``base`` the
    solve is used. ``−C⁻¹ B A⁻¹`` is formed ``base`` rows at a time (the row block of the
    triangular ``C⁻¹`` reaches only the columns up to its last row), so the temporaries stay
    ``base`` rows high and ``feedback_operator``'s peak stays what the plan counts."""
    n = low.shape[-1]
    if n <= base:
        eye = torch.eye(n, dtype=low.dtype, device=low.device).expand_as(low)
        torch.linalg.solve_triangular(low, eye, upper=False, out=out)
        return
    k = n // 2 // 128 * 128 or n // 2
    lower_inverse_into(low[..., :k, :k], out[..., :k, :k], base)
    lower_inverse_into(low[..., k:, k:], out[..., k:, k:], base)
    out[..., :k, k:] = 0
    for r0 in range(k, n, base):
        r1 = min(r0 + base, n)
        part = torch.matmul(out[..., r0:r1, k:r1], low[..., k:r1, :k])
        out[..., r0:r1, :k] = torch.matmul(part, out[..., :k, :k]).neg_()


def _subtract_product(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``dst -= a @ b`` per batch element (``dst`` ``[E, r, m]``, ``a`` ``[E or 1, r, k]``,
    ``b`` ``[E or 1, k, m]``), in place on a view. On a GPU a stack is one ``baddbmm_``. On the
    CPU every element takes ``addmm_``, a single weight's product: MKL's batched kernel is 1.5x
    slower at one element, and on AVX-512 machines it sums in another order than ``addmm_`` (a
    batched solve then differed from the single ones in the last bit), so a batched solve is
    bitwise the single ones by construction, at some speed (32 experts, 256 x 512 each, static
    groups: 0.36 s against 0.29 s batched)."""
    n = dst.shape[0]
    if n == 1 or not dst.is_cuda:
        for e in range(n):
            dst[e].addmm_(a[min(e, a.shape[0] - 1)], b[min(e, b.shape[0] - 1)], alpha=-1.0)
    else:
        dst.baddbmm_(a.expand(n, -1, -1), b.expand(n, -1, -1), alpha=-1.0)


class SolveOptions(TypedDict, total=False):
    """GPTQ's options, the same for one weight and for a batch (defaults in
    ``gptq_quantize_batch``)."""

    block_size: int
    dampening_frac: float
    act_order: bool
    static_groups: bool
    clip_search: bool


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    name: str = "weight",
    global_scale: torch.Tensor | None = None,
    **options: Unpack[SolveOptions],
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
    It is ``gptq_quantize_batch`` on a batch of one.
    """
    out_f, in_f = w.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in_features {in_f}")
    return gptq_quantize_batch(w.unsqueeze(0), hessian.unsqueeze(0), scheme, names=[name],
                               global_scales=[global_scale], **options)[0]


def batchable(ws: WeightScheme, out_features: int, static_groups: bool) -> bool:
    """Whether weights of ``out_features`` rows can share one batched solve: everything but
    row blocks taken during the column loop (dynamic groups) that would straddle two weights
    once their rows are flattened together."""
    dynamic = column_group_width(ws, 0) is not None and not static_groups
    return not (dynamic and ws.strategy == "block" and out_features % ws.block_size[0])


def gptq_quantize_batch(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    names: Sequence[str] | None = None,
    global_scales: Sequence[torch.Tensor | None] | None = None,
    inverse_factor: torch.Tensor | None = None,
) -> list[QuantizedWeight]:
    """``gptq_quantize`` for a stack of ``E`` weights ``[E, out, in]`` of one scheme at once,
    each with its own Hessian (``hessian`` ``[E, in, in]``) or all with one (``[1, in, in]``);
    one result per weight, as ``gptq_quantize`` gives it.

    The batch dimension is carried through every step (damping, factorisation, act-order
    permutation, the column loop), so the E solves cost one factorisation call and one
    sequential column loop: on a GPU the loop is launch-bound, and a MoE layer's 128 experts
    launch one loop's kernels instead of 128 loops'. With per-column parameters fixed before
    the loop on an int grid (static groups, channels), each block's loop is one Triton kernel
    on a GPU (``gptq_block_kernel``; whole solves 0.33-0.75x the CUDA-graphed torch loop's
    time on an H200, ``benchmarks/gptq_column_loop.py``). Parameters fixed before the loop
    (and ``clip_search``) are taken per weight; per-row column-group parameters during the
    loop see the weights' rows flattened together (``batchable`` says when that is allowed).
    On CPU each weight's result is bitwise the single solve's; on CUDA the batched kernels may
    round differently (float32 rounding, not a different algorithm). ``names`` name the
    weights in errors and logs; ``global_scales`` are each weight's tensor_group global scale
    (None: its own, as in ``gptq_quantize``). ``inverse_factor`` (each damped ``H⁻¹``'s upper
    Cholesky factor in the visiting order, as ``feedback_operator`` builds it from the same
    Hessian) saves factoring the Hessians again.
    """
    ws: WeightScheme = scheme.weights
    n_w, out_f, in_f = w.shape
    names = list(names) if names is not None else [f"weight {e}" for e in range(n_w)]
    label = names[0] if n_w == 1 else f"{names[0]} .. {names[-1]} ({n_w} weights)"
    n_h = hessian.shape[0]
    if hessian.shape[1:] != (in_f, in_f) or n_h not in (1, n_w):
        raise ValueError(f"{label}: Hessian stack {tuple(hessian.shape)} does not match weights {tuple(w.shape)}")
    group = column_group_width(ws, in_f)
    if group is not None and ws.strategy != "block" and in_f % group:
        raise ValueError(f"{label}: in_features {in_f} is not a multiple of group_size {group}")
    dynamic_groups = group is not None and not static_groups
    if dynamic_groups and act_order and ws.layout.kind != "group":
        raise ValueError(f"{label}: act-order with {ws.strategy} scales needs static groups")
    if n_w > 1 and not batchable(ws, out_f, static_groups):
        raise ValueError(f"{label}: row blocks of {ws.block_size[0]} straddle weights of {out_f} rows; "
                         "solve them one at a time")
    device = w.device

    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise NumericsError(f"GPTQ {label}: the Hessian has NaN/Inf", file=label,
                            hint="the calibration activations are not finite")
    # Columns whose input was always zero: their weight cannot matter, so zero it and give
    # the Hessian a unit diagonal there (reference behaviour).
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0
    H.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(1), 0.0)
    gscales = _global_scales(W, ws, global_scales, label)
    # one global scale per row of the flattened weights, for the column groups of the loop
    row_global = None if gscales[0] is None else torch.cat(
        [g.reshape(1).expand(out_f) for g in gscales]).unsqueeze(1)

    # Per-column parameters fixed before the loop (natural order), when not dynamic groups.
    col_scale = col_zero = None
    fixed: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    if not dynamic_groups:
        col_scale = torch.empty_like(W)
        col_zero = None if ws.symmetric else torch.empty_like(W)
        for e in range(n_w):
            ranged = W[e]
            if clip_search and ws.strategy in ("channel", "group"):
                ranged = clip_to_gram(W[e], group_grams(H[min(e, n_h - 1)], group or in_f), scheme)
            scale, zero = weight_qparams(ranged, ws, gscales[e])
            col_scale[e] = ws.layout.expand(effective_scale(scale, gscales[e]), out_f, in_f)
            if zero is not None:
                col_zero[e] = ws.layout.expand(zero, out_f, in_f)
            fixed.append((scale, zero))
        del ranged

    perm = None
    if act_order:
        # stable: ties (dead columns) keep their order on every device and batch size
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True, stable=True)
        if inverse_factor is None:
            H = H.gather(1, perm.unsqueeze(2).expand(-1, -1, in_f)).gather(2, perm.unsqueeze(1).expand(-1, in_f, -1))
        cols = perm.unsqueeze(1).expand(n_w, out_f, in_f)
        W = W.gather(2, cols)
        if col_scale is not None:
            col_scale = col_scale.gather(2, cols)
            col_zero = None if col_zero is None else col_zero.gather(2, cols)

    Hinv = inverse_factor.to(device=device, dtype=torch.float32) if inverse_factor is not None else \
        _inverse_hessian_factor(H, dampening_frac, names if n_h == n_w else [label])
    del H

    bs = max(1, block_size)
    if dynamic_groups:
        bs = max(group, (bs // group) * group)
    codes = torch.empty(n_w, out_f, in_f, dtype=ws.grid.code_dtype, device=device)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []
    asym = not ws.symmetric
    fused = not dynamic_groups and ws.grid.type == "int" and gptq_block_kernel.available(device)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        n = i2 - i1
        if fused:
            done = gptq_block_kernel.quantize_block(
                W[:, :, i1:i2], Hinv[:, i1:i2, i1:i2], col_scale[:, :, i1:i2],
                None if col_zero is None else col_zero[:, :, i1:i2], ws.grid.qmin, ws.grid.qmax)
            if done is not None:
                codes[:, :, i1:i2] = done[0]
                _subtract_product(W[:, :, i2:], done[1], Hinv[:, i1:i2, i2:])
                continue
            fused = False
        # The block column-major ([E, n, rows]): each column the loop visits is contiguous.
        W1 = W[:, :, i1:i2].transpose(1, 2)
        S = None if dynamic_groups else col_scale[:, :, i1:i2].transpose(1, 2)
        Z = None if dynamic_groups or col_zero is None else col_zero[:, :, i1:i2].transpose(1, 2)
        graph = (_block_graph(n_w, n_h, out_f, n, device, dynamic_groups, asym, ws, group, row_global)
                 if n == bs else None)
        if graph is not None:
            C1, Err1, GS, GZ = graph.run(W1, Hinv[:, i1:i2, i1:i2], S, Z, row_global)
        else:
            # copies: W's columns before i2 are never read again
            W1, S, Z = (None if t is None else t.contiguous() for t in (W1, S, Z))
            C1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
            GS = GZ = None
            if dynamic_groups:
                GS = torch.empty(n_w * out_f, math.ceil(n / group), device=device)
                GZ = (torch.empty(n_w * out_f, math.ceil(n / group), device=device, dtype=torch.int8)
                      if asym else None)
            _quantize_block(W1, Hinv[:, i1:i2, i1:i2], C1, Err1, S, Z, GS, GZ, ws, group, row_global)
        codes[:, :, i1:i2] = C1.transpose(1, 2).to(codes.dtype)
        if GS is not None:
            group_scales.append(GS.clone())
            if GZ is not None:
                group_zeros.append(GZ.clone())
        _subtract_product(W[:, :, i2:], Err1.transpose(1, 2), Hinv[:, i1:i2, i2:])

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm, dim=1)
        # gathered as raw bytes: CPU gather has no float8 kernel
        raw = codes.view(torch.uint8) if codes.element_size() == 1 else codes
        codes = raw.gather(2, invperm.unsqueeze(1).expand(n_w, out_f, in_f)).view(codes.dtype)
        if dynamic_groups:
            g_idx = (torch.arange(in_f, device=device) // group)[invperm].to(torch.int32)

    if dynamic_groups:
        scale = torch.cat(group_scales, dim=1).view(n_w, out_f, -1)
        zero = torch.cat(group_zeros, dim=1).view(n_w, out_f, -1) if group_zeros else None
        if ws.strategy == "block":  # column groups held each row's block scale: one row per block
            scale = scale[:, :: ws.block_size[0]]
        fixed = [(scale[e], None if zero is None else zero[e]) for e in range(n_w)]
    finite = torch.stack([torch.isfinite(s).all() for s, _ in fixed])
    if not bool(finite.all()):
        bad = names[int((~finite).nonzero()[0])]
        raise NumericsError(f"GPTQ {bad}: non-finite scales", file=bad, hint="the weight has NaN/Inf")
    actorder = "group" if g_idx is not None else "static" if act_order and group is not None else None
    out_scheme = scheme
    if ws.actorder != actorder:
        out_scheme = Scheme(replace(ws, actorder=actorder), scheme.input_activations)

    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        """One weight's part of a stacked tensor as a tensor of its own (a view when alone)."""
        return None if t is None else t.contiguous() if n_w == 1 else t.clone()

    return [QuantizedWeight(codes=own(codes[e]), scale=own(s), zero_point=own(z), scheme=out_scheme,
                            g_idx=None if g_idx is None else own(g_idx[min(e, n_h - 1)]), global_scale=gscales[e])
            for e, (s, z) in enumerate(fixed)]


def _global_scales(W: torch.Tensor, ws: WeightScheme, given: Sequence[torch.Tensor | None] | None,
                   label: str) -> list[torch.Tensor | None]:
    """Each weight's global scale on its device: the one given, or for a tensor_group scheme
    the weight's own; all None or none None."""
    given = list(given) if given is not None else [None] * W.shape[0]
    out = [weight_global_scale([W[e]], ws) if g is None and ws.has_global_scale else g for e, g in enumerate(given)]
    if len({g is None for g in out}) > 1:
        raise ValueError(f"{label}: global scales given for some weights of the batch and not for others")
    return [None if g is None else g.to(device=W.device, dtype=torch.float32) for g in out]


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
    share one), with its scale format and global scale (one, or one per row ``[rows, 1]``)."""
    rows, k = cols.shape
    one = replace(ws, block_size=(ws.block_size[0], k)) if ws.strategy == "block" else replace(ws, group_size=k)
    scale, zero = weight_qparams(cols, one, global_scale)
    scale = one.layout.expand(scale, rows, k)[:, 0]
    return scale, None if zero is None else one.layout.expand(zero, rows, k)[:, 0]


SUB_BLOCK = 16
"""Columns whose updates reach each other at once inside a block; the rest of the block gets
them as one product per sub-block. GPTQ's column loop otherwise rewrites every remaining
column of the block for each column it visits, most of its memory traffic on a GPU."""


def _sub_block(n: int, group: int | None, dynamic: bool) -> int:
    """Sub-block width: whole dynamic groups (a group's parameters are taken from its columns
    once every earlier column's update has reached them), else ``SUB_BLOCK``."""
    width = group * max(1, SUB_BLOCK // group) if dynamic and group else SUB_BLOCK
    return min(n, width)


def _quantize_block(W1, Hinv1, C1, Err1, S, Z, GS, GZ, ws: WeightScheme, group: int | None,
                    global_scale: torch.Tensor | None = None) -> None:
    """GPTQ's sequential loop over one block's columns, in place, for a stack of weights.

    The block is column-major: ``W1`` ``[E, n, rows]`` (column ``i`` of every weight is
    ``W1[:, i]``, contiguous) is updated as columns are quantized, each weight with its own
    ``Hinv1`` (``[E, n, n]``, or ``[1, n, n]`` shared); ``C1`` gets the codes (as floats),
    ``Err1`` the scaled errors the caller pushes onto later blocks, both ``[E, n, rows]``.
    Per-column effective scale/zero come from ``S``/``Z`` (``[E, n, rows]``), or, when ``S``
    is None (dynamic groups; the block is whole groups), from each group's up-to-date
    weights, written (as stored) to ``GS``/``GZ`` ``[E * rows, groups]``, with the weights'
    rows flattened (as is ``global_scale``, ``[E * rows, 1]``). A column's update reaches the
    rest of its sub-block at once and the rest of the block at the sub-block's end (the same
    sums, grouped: the reference's lazy batch one level down).
    Few in-place ops per column and no host sync: on a GPU this loop is launch-bound, and it
    is captured as a CUDA graph.
    """
    grid = ws.grid
    n_w, n, rows = W1.shape
    row_global = None if global_scale is None else global_scale[:, 0]
    sub = _sub_block(n, group, S is None)
    for j1 in range(0, n, sub):
        j2 = min(j1 + sub, n)
        for i in range(j1, j2):
            if S is None:
                if i % group == 0:
                    cols = W1[:, i : i + group].transpose(1, 2).reshape(n_w * rows, -1)
                    sg, zg = column_group_qparams(cols, ws, global_scale)
                    GS[:, i // group] = sg
                    s = effective_scale(GS[:, i // group], row_global).reshape(n_w, rows)
                    z = None
                    if zg is not None:
                        GZ[:, i // group] = zg
                        z = zg.to(torch.float32).reshape(n_w, rows)
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
            err.div_(Hinv1[:, i, i].unsqueeze(1))
            # a matrix product with an inner dimension of 1, not addr_ or a broadcast multiply:
            # the same outer product, but on CPU those are 10-100x slower (naive kernels, not BLAS).
            _subtract_product(W1[:, i:j2], Hinv1[:, i : i + 1, i:j2].transpose(1, 2), err.unsqueeze(1))
        if j2 < n:
            _subtract_product(W1[:, j2:], Hinv1[:, j1:j2, j2:].transpose(1, 2), Err1[:, j1:j2])


class _BlockGraph:
    """``_quantize_block`` captured once as a CUDA graph over static buffers, then replayed
    per block: one launch instead of about ten kernel launches per column."""

    def __init__(self, n_w: int, n_h: int, rows: int, n: int, device: torch.device, dynamic: bool, asym: bool,
                 ws: WeightScheme, group: int | None, global_scale: torch.Tensor | None):
        f32 = dict(device=device, dtype=torch.float32)
        self.W1, self.Hinv1 = torch.zeros(n_w, n, rows, **f32), torch.eye(n, **f32).repeat(n_h, 1, 1)
        self.C1, self.Err1 = torch.zeros(n_w, n, rows, **f32), torch.zeros(n_w, n, rows, **f32)
        self.S = None if dynamic else torch.ones(n_w, n, rows, **f32)
        self.Z = torch.zeros(n_w, n, rows, **f32) if asym and not dynamic else None
        self.GS = torch.ones(n_w * rows, math.ceil(n / group), **f32) if dynamic else None
        self.GZ = (torch.zeros(n_w * rows, math.ceil(n / group), device=device, dtype=torch.int8)
                   if dynamic and asym else None)
        # the global scales are the weights': a replay for other weights copies theirs in
        self.global_scale = None if global_scale is None else global_scale.clone()
        args = (self.W1, self.Hinv1, self.C1, self.Err1, self.S, self.Z, self.GS, self.GZ, ws, group,
                self.global_scale)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            _quantize_block(*args)  # warm-up outside the capture, as CUDA graphs require
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local: the engine's background threads (the work folder's layer writer, the
        # export) copy other tensors off the device meanwhile; in the default global mode such
        # a copy during the capture fails in that thread and invalidates the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
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


def _block_graph(n_w: int, n_h: int, rows: int, n: int, device: torch.device, dynamic: bool, asym: bool,
                 ws: WeightScheme, group: int | None, global_scale: torch.Tensor | None) -> _BlockGraph | None:
    """The cached graph for this block shape (``n_w`` weights of ``rows`` rows, ``n_h``
    Hessians), or None (CPU, disabled, or capture failed: the eager loop computes the same
    thing). Set QUANTKIT_CUDA_GRAPHS=0 to disable."""
    if device.type != "cuda" or os.environ.get("QUANTKIT_CUDA_GRAPHS", "1") == "0":
        return None
    key = (n_w, n_h, rows, n, str(device), dynamic, asym, ws, group, global_scale is None)
    if key not in _GRAPHS:
        if len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        try:
            _GRAPHS[key] = _BlockGraph(n_w, n_h, rows, n, device, dynamic, asym, ws, group, global_scale)
        except RuntimeError as e:  # capture unsupported here: fall back to the eager loop
            log.warning("GPTQ: CUDA graph capture failed (%s); using the eager column loop", e)
            _GRAPHS[key] = None
    return _GRAPHS[key]


# Float32 [in, in] matrices alive at once at feedback_operator's peak, as measured by the tests on
# the CPU (a product's two factors, the output, the split of the second factor and the CPU's
# float32 copy of one half of it, which the GPU does not take).
FEEDBACK_TARGET_MATRICES = 5


@dataclass(frozen=True)
class FeedbackOperator:
    """GPTAQ's correction of one input group's weights: ``W' = W (I − P)⁻¹``, with ``I − P``
    (``lhs``, upper triangular) in the visiting ``order``. It depends on the group's Hessians
    alone, so q/k/v (gate/up) share one. ``upper`` is the upper Cholesky factor of the damped
    ``H̃⁻¹`` in that order it was built from: GPTQ's solve of the group factors the same
    matrix, and takes it instead."""

    order: torch.Tensor
    lhs: torch.Tensor
    upper: torch.Tensor

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        shifted = torch.linalg.solve_triangular(self.lhs, w.detach().to(self.lhs.dtype)[:, self.order], upper=True,
                                                left=False)
        return shifted[:, torch.argsort(self.order)]


def feedback_operator(h_quant: torch.Tensor, cross: torch.Tensor, dampening_frac: float, alpha: float = 0.25,
                      act_order: bool = False, name: str = "weight") -> FeedbackOperator:
    """The operator taking a weight to the one GPTQ should quantize so that the quantized
    Linear on the quantized model's inputs ``X̃`` approaches the float Linear on the float
    inputs ``X`` (GPTAQ, Li et al. 2025).

    GPTAQ adds to GPTQ's column loop, for each column ``i`` visited, ``w_i · P[i, i+1:]`` on the
    columns not yet visited, with ``P = α · triu₁((ΔXᵀX̃) Uᵀ) U``, ``ΔX = X − X̃`` and ``U`` the
    upper Cholesky factor of the damped ``H̃⁻¹`` in the visiting order: each column's input
    mismatch is compensated by the columns after it only, shrunk by ``α``. Without rounding
    that loop ends at ``W' = W (I − P)⁻¹``: the loop's own updates differ from it only by
    products of the rounding errors with ``P``.

    The unmasked, unshrunk target (``α = 1`` on the whole of ``(ΔXᵀX̃) H̃⁻¹``, the exact least
    squares fit of ``X Wᵀ`` on ``X̃``) fits the calibration tokens' stream mismatch and is
    far worse on held-out text (docs/quality.md). ``cross`` is ``X̃ᵀX`` on the scale of
    ``h_quant = X̃ᵀX̃``; ``act_order`` visits columns as GPTQ's act-order does.

    In float32, as the statistics are accumulated and GPTQ's own solve factors them, with
    the two ``[in, in]`` products on bf16 tensor cores (``split_product``): float64 took
    0.29 s for a 14336-wide down_proj on an H200 and 2.1 s for a 28672-wide one
    (``benchmarks/feedback_target_speed.py``). Float64 statistics are taken in float64 with
    exact products (the benchmark's reference). Each product computes only the blocks on and
    above the diagonal, against the factors' nonzero blocks (``upper_blocks_product``): ``P``
    is strictly upper triangular, ``U`` upper.
    """
    # [in, in] matrices, each freed as soon as it is used (FEEDBACK_TARGET_MATRICES).
    dtype = torch.promote_types(h_quant.dtype, torch.float32)
    diag = torch.diagonal(h_quant).to(dtype)
    diag.masked_fill_(diag == 0, 1.0)  # dead columns, as the solve patches them
    in_f = diag.shape[0]
    order = (torch.argsort(diag, descending=True, stable=True) if act_order
             else torch.arange(in_f, device=diag.device))

    def visited(t: torch.Tensor) -> torch.Tensor:
        """``t`` in ``dtype``, rows and columns in the visiting order."""
        return t.detach()[order.unsqueeze(1), order.unsqueeze(0)].to(dtype)

    h = visited(h_quant)
    h.diagonal().copy_(diag[order])
    # Damped, and retried with more damping, exactly as GPTQ's own solve: that solve takes this factor.
    upper = _inverse_hessian_factor(h.unsqueeze(0), dampening_frac, [name])[0]
    del h
    # ΔXᵀX̃ = (X̃ᵀX − X̃ᵀX̃)ᵀ, dead columns patched as above; exactly zero when the streams are equal
    mismatch, quant = visited(cross), visited(h_quant)
    quant.diagonal().copy_(diag[order])
    mismatch = mismatch.sub_(quant).T
    del quant
    p = upper_blocks_product(mismatch, upper.T, b_lower=True).triu_(1)
    del mismatch
    p.mul_(alpha)
    p = upper_blocks_product(p, upper, a_upper=True, b_upper=True)
    p.neg_().diagonal().add_(1.0)  # I − P (P is strictly upper triangular)
    return FeedbackOperator(order, p, upper)


def feedback_target(w: torch.Tensor, h_quant: torch.Tensor, cross: torch.Tensor, dampening_frac: float,
                    alpha: float = 0.25, act_order: bool = False, name: str = "weight") -> torch.Tensor:
    """The weight GPTQ should quantize for ``w`` under input feedback (``feedback_operator``)."""
    return feedback_operator(h_quant, cross, dampening_frac, alpha, act_order, name).apply(w)


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
    input_feedback: bool = Field(False, description="GPTAQ: each column's input mismatch between the quantized and "
                                 "the float model is compensated by the columns not yet quantized (alpha 0.25); "
                                 "keeps a second calibration stream")
    clip_search: bool = Field(False, description="shrink each group's range where that lowers its Hessian-weighted "
                              "error before the column loop (static groups or per channel)")
    sequential: bool = Field(False, description="quantize a layer's input groups in the order its forward reaches "
                             "them, each calibrated on the layer with the groups before it already quantized "
                             "(one calibration pass per group; a MoE block's experts take two)")

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
    """One input group's Hessians on both streams: of the quantized-stream inputs, and the
    cross term with the float-stream inputs. Both are read by the same solves, so they have
    one ``owner`` (``hessians_to_owners``), with which the engine feeds a MoE expert's on that
    rank alone."""

    def __init__(self, acc: HessianAccumulator, cross: HessianAccumulator) -> None:
        self.acc, self.cross = acc, cross

    @property
    def owner(self) -> int | None:
        return self.acc.owner if self.acc.owner == self.cross.owner else None

    def add(self, xq: torch.Tensor, xf: torch.Tensor) -> None:
        self.acc.add(xq)
        self.cross.add(xq, xf)

    def reduce(self, world: World) -> None:
        self.acc.reduce(world)
        self.cross.reduce(world)


class _OnQuantized:
    """A statistic of one input (an input global scale's range) watching the quantized
    stream of a pair, the one the served model computes on."""

    def __init__(self, stat) -> None:
        self.stat = stat

    def add(self, xq: torch.Tensor, xf: torch.Tensor) -> None:
        self.stat.add(xq)

    def reduce(self, world: World) -> None:
        self.stat.reduce(world)


def collect_paired_hessians(
    graph, stats: Mapping | None = None, names=None
) -> tuple[dict[str, HessianAccumulator], dict[str, HessianAccumulator], dict[str, _PairedHessians | Joined]]:
    """Per input group: the Hessian of the quantized-stream inputs ``X̃ᵀX̃`` and the cross
    term ``X̃ᵀX`` with the float-stream inputs, keyed by every Linear of the group, and the
    paired statistics that feed them (``stats``, one input each, joined on the quantized
    stream); with ``names``, only groups holding one of them."""
    stats = dict(stats or {})
    accs: dict[str, HessianAccumulator] = {}
    crosses: dict[str, HessianAccumulator] = {}
    paired: dict[str, _PairedHessians | Joined] = {}
    for g in graph.groups:
        if names is not None and not set(g.linears) & set(names):
            continue
        width = graph.unit(g.key).in_features
        acc, cross = HessianAccumulator(g.key, width), HessianAccumulator(g.key, width)
        for n in g.linears:
            accs[n], crosses[n] = acc, cross
        also = stats.pop(g.key, None)
        both = _PairedHessians(acc, cross)
        paired[g.key] = both if also is None else Joined(both, _OnQuantized(also))
    return accs, crosses, paired


@dataclass(frozen=True)
class SolvePart:
    """One job of GPTQ solves, run on one owner rank: ``stacks`` of Linears that share a
    Hessian, a scheme and a global scale, each stack's weights stacked by rows (a stack of one
    Linear is solved alone). Several stacks in one part are MoE experts of one shape, solved
    as one batch (``gptq_quantize_batch``). ``cost`` is estimated for the owner assignment."""

    stacks: tuple[tuple[str, ...], ...]
    scheme: Scheme
    cost: float
    # The rank that owns the experts solved here (and holds their statistics); None: any.
    owner: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for stack in self.stacks for n in stack)

    @property
    def key(self) -> str:
        return "+".join(self.names)


def solve_parts(layer, graph, accs: Mapping[str, HessianAccumulator], schemes: Mapping[str, Scheme],
                world: World = SINGLE, expert_owner: Callable[[str], int | None] | None = None) -> list[SolvePart]:
    """The solves of ``gptq_layer``, known before any statistic (shapes, schemes, which Linears
    share a Hessian and a global scale), so Hessians can be reduced to where they are solved.

    Linears that share a Hessian and a scheme (q/k/v; gate/up) are solved as one weight with
    their rows stacked: GPTQ treats rows independently given ``H`` (scales are per row, row
    group or row block, and the error update of a row reads only that row), so this is the
    same computation with one Cholesky factorisation and one sequential column loop instead
    of three or two. A stack is cut into row chunks of at most ``MAX_STACKED_ELEMENTS``, and
    a stack of experts (a MoE layer's gate/up all share one Hessian) into one part per owner
    rank (``expert_owner``, the calibration's: an expert is solved where its statistics are;
    without it, at least one part per rank). The experts' solves of one shape and
    scheme (every down_proj, each with its own Hessian; the gate/up row chunks) are then
    batched (`_batched`): hundreds of small solves are launch-bound on a GPU."""
    globals_ = fused_global_scales(layer, graph, schemes)
    # One stack per Hessian, scheme and global scale (a MoE layer's experts share a Hessian
    # but each fused gate/up pair has its own global scale).
    by_key: dict[tuple[int, Scheme, int], list[str]] = {}
    for name, scheme in schemes.items():
        by_key.setdefault((id(accs[name]), scheme, id(globals_.get(name))), []).append(name)
    parts = []
    for (_, scheme, _), stack in by_key.items():
        by_owner: dict[int | None, list[str]] = {}
        for n in stack:
            by_owner.setdefault(expert_owner(n) if expert_owner is not None else None, []).append(n)
        for owner, names in by_owner.items():
            units = [graph.unit(n) for n in names]
            stacked = _stackable(scheme.weights, [u.out_features for u in units])
            sizes = [u.out_features * u.in_features for u in units]
            cap = MAX_STACKED_ELEMENTS
            if owner is None and world.size > 1 and all(expert_of(n) is not None for n in names):
                cap = min(cap, -(-sum(sizes) // world.size))
            in_f = units[0].in_features
            for part in _row_chunks(names, sizes, cap) if stacked else [[n] for n in names]:
                rows = sum(graph.unit(n).out_features for n in part)
                # The column loop touches rows x in^2 / 2 elements, the factorisations about in^3.
                parts.append(SolvePart((tuple(part),), scheme, float(in_f) * in_f * (rows + in_f), owner))
    keys = [_batch_key(p, graph) for p in parts]
    if all(k is None for k in keys):  # no experts to batch: no budget to agree on over the ranks
        return parts
    device = graph.unit(next(iter(schemes))).matrix(layer).device
    return _batched(parts, keys, accs, _batch_budget(device, world), world)


def _batch_key(part: SolvePart, graph) -> tuple | None:
    """What MoE experts' parts share to be solved in one batch (scheme, rows, in_features);
    None for a part that is not one stack of experts."""
    if len(part.stacks) != 1 or not all(expert_of(n) is not None for n in part.names):
        return None
    units = [graph.unit(n) for n in part.stacks[0]]
    return part.scheme, sum(u.out_features for u in units), units[0].in_features, part.owner


def _batched(parts: list[SolvePart], keys: list[tuple | None], accs: Mapping[str, HessianAccumulator],
             budget: int, world: World) -> list[SolvePart]:
    """``parts`` with the MoE experts' parts of one key (``_batch_key``) joined into batches,
    as many as ``budget`` bytes allow and, on several ranks, at most their share of the parts
    (so every rank gets work) unless one owner holds them all; every other part alone, as before."""
    share = Counter(k for k in keys if k is not None)
    out: list[SolvePart] = []
    open_: dict[tuple, tuple[int, int]] = {}  # key -> (index in out, bytes used)
    for p, k in zip(parts, keys):
        if k is None:
            out.append(p)
            continue
        rows, in_f = k[1], k[2]
        at, used = open_.get(k, (-1, 0))
        batch = out[at] if at >= 0 else None
        shared_h = batch is not None and any(accs[s[0]] is accs[p.stacks[0][0]] for s in batch.stacks)
        # the solve's float32 working set: the weight about four times over (itself, its
        # codes, column parameters, the block buffers) and a Hessian of its own five times
        # (the stack passed in, its copy, and the factorisation's three at its peak)
        cost = 16 * rows * in_f + (0 if shared_h else 20 * in_f * in_f)
        ranks = world.size if k[3] is None else 1
        full = batch is not None and (used + cost > budget or len(batch.stacks) >= -(-share[k] // ranks))
        if batch is None or full:
            out.append(p)
            open_[k] = (len(out) - 1, 16 * rows * in_f + 20 * in_f * in_f)
            continue
        out[at] = SolvePart(batch.stacks + p.stacks, p.scheme, batch.cost + p.cost, p.owner)
        open_[k] = (at, used + cost)
    return out


def hessians_to_owners(parts: list[SolvePart], world: World, *accs: Mapping[str, HessianAccumulator]) -> None:
    """Give each Hessian that only one rank's solves read that rank as its ``owner``: it is
    reduced to that rank alone and the others drop it (the traffic is a reduce instead of an
    all-reduce), or, for an expert's Hessian (its parts pinned to the expert's owner), the
    calibration feeds it on that rank alone. Hessians several ranks' solves read (a MoE
    layer's shared gate/up one, cut into parts) are all-reduced."""
    owner = world.owners({p.key: p.cost for p in parts}, pinned(parts))
    for group in accs:
        readers: dict[int, set[int]] = {}
        for p in parts:
            for n in p.names:
                readers.setdefault(id(group[n]), set()).add(owner[p.key])
        for acc in {id(a): a for a in group.values()}.values():
            ranks = readers.get(id(acc), set())
            acc.owner = next(iter(ranks)) if len(ranks) == 1 else None


def pinned(parts: list[SolvePart]) -> dict[str, int]:
    """The parts solved on their experts' owner rank."""
    return {p.key: p.owner for p in parts if p.owner is not None}


class StackTarget(NamedTuple):
    """What GPTQ approximates for the Linears of one stack, and the upper Cholesky factor of
    their damped inverse Hessian in the visiting order when the target's maker has it."""

    weights: list[torch.Tensor]
    inverse_factor: torch.Tensor | None = None


def gptq_layer(
    layer, graph, accs: dict[str, HessianAccumulator], schemes: Scheme | Mapping[str, Scheme],
    world: World = SINGLE, target: Callable[[Sequence[str]], StackTarget] | None = None,
    parts: list[SolvePart] | None = None, **kwargs
) -> dict[str, QuantizedWeight]:
    """GPTQ the units of ``schemes`` (or every unit of ``graph`` with one scheme) with the
    Hessians already accumulated (and reduced) in ``accs``, each of ``parts`` (``solve_parts``)
    solved on its owner rank of ``world``. Linears stacked in one solve share one global
    scale (tensor_group), as vLLM needs for the matrix it fuses them into; it is taken from
    the layer's own weights. ``target(stack)`` is what GPTQ approximates for the Linears of
    one stack (they share a Hessian): their weights, or the input feedback's targets, whose
    operator the stack shares.
    """
    if isinstance(schemes, Scheme):
        schemes = {n: schemes for n in graph.linears}
    target = target or (lambda stack: StackTarget([graph.unit(n).matrix(layer).detach() for n in stack]))
    globals_ = fused_global_scales(layer, graph, schemes)  # from the weights alone: the same on every rank
    parts = parts if parts is not None else solve_parts(layer, graph, accs, schemes, world)
    static_groups = kwargs.get("static_groups", False)

    def solve(part: SolvePart) -> dict[str, QuantizedWeight]:
        solves = []
        for stack in part.stacks:
            ws, factor = target(stack)
            solves.append((stack, [w.shape[0] for w in ws], torch.cat(ws) if len(ws) > 1 else ws[0],
                           accs[stack[0]].hessian(), globals_.get(stack[0]), factor))
        together = len(solves) > 1 and batchable(part.scheme.weights, solves[0][2].shape[0], static_groups)
        out: dict[str, QuantizedWeight] = {}
        for batch in [solves] if together else [[s] for s in solves]:
            hessians = [s[3] for s in batch]
            shared_h = all(h is hessians[0] for h in hessians)
            factors = [s[5] for s in batch]
            factor = None if any(f is None for f in factors) else _stack(factors[:1] if shared_h else factors)
            results = gptq_quantize_batch(_stack([s[2] for s in batch]), _stack(hessians[:1] if shared_h else hessians),
                                          part.scheme, names=["+".join(s[0]) for s in batch],
                                          global_scales=[s[4] for s in batch], inverse_factor=factor, **kwargs)
            for (stack, rows, *_), qw in zip(batch, results):
                out.update(split_rows(qw, list(stack), rows) if len(stack) > 1 else {stack[0]: qw})
        return out

    return solve_units(world, {p.key: (p.cost, lambda p=p: solve(p)) for p in parts}, pinned(parts))


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """``ts`` stacked on a new first dimension; a view for one tensor (no copy of a lone weight)."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


# Of the GPU's free memory before a layer's calibration, what one batched solve may take: the
# statistics take up to `moe.STATISTICS_SHARE` (a half) of it, the batch half of the rest.
BATCH_SHARE = 0.25


def _batch_budget(device: torch.device, world: World) -> int:
    """Bytes one batched solve may take: a share of the GPU's free memory (counting what
    torch's allocator holds unused), the least over the ranks (every rank must batch alike),
    or on the CPU what one row-stacked solve may take (batching saves launches, which a CPU
    barely pays)."""
    if device.type != "cuda":
        return 4 * MAX_STACKED_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    least = world.all_reduce(torch.tensor([free], dtype=torch.int64, device=world.device), "min")
    return int(int(least.item()) * BATCH_SHARE)


# Weights stacked into one GPTQ solve hold at most this many elements (1 GiB in float32, as
# the solve works): every expert of a MoE layer shares one gate/up Hessian, and DeepSeek-V3's
# 512 expert matrices stacked at once would take 30 GB in float32 beside the layer.
MAX_STACKED_ELEMENTS = 1 << 28


def _row_chunks(names: list[str], sizes: list[int], cap: int) -> list[list[str]]:
    """``names`` in consecutive runs whose weights hold at most ``cap`` elements (one name per
    run when a single weight is larger), as even as the fewest runs allow: a MoE block's 256
    equal gate/up matrices become two runs of 128, not 170 and 86, so the runs have one shape
    and are solved as one batch."""
    runs = _runs(names, sizes, cap)
    if len(runs) > 1:
        runs = _runs(names, sizes, min(cap, -(-len(names) // len(runs)) * max(sizes)))
    return runs


def _runs(names: list[str], sizes: list[int], cap: int) -> list[list[str]]:
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
        if params.input_feedback:
            self.statistics = ("the quantized inputs' Hessian", "its cross term with the float inputs")
            self.target_matrices = FEEDBACK_TARGET_MATRICES

    def quantize_layer(self, layer, graph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        schemes = self.schemes_or_default(graph, schemes)
        stages = sequential_stages(graph) if self.params.sequential else [graph]  # type: ignore[attr-defined]
        if len(stages) == 1:
            return self._quantize_groups(layer, graph, calib, schemes)
        out: dict[str, QuantizedWeight] = {}
        for k, stage in enumerate(stages):
            names = set(stage.linears)
            done = self._quantize_groups(layer, stage, calib, {n: s for n, s in schemes.items() if n in names},
                                         later=[n for s in stages[k + 1:] for n in s.linears])
            calib.substitute(done)
            out.update(done)
        return out

    def _quantize_groups(self, layer, graph, calib: LayerCalibration, schemes,
                         later: Sequence[str] = ()) -> dict[str, QuantizedWeight]:
        p: GPTQParams = self.params  # type: ignore[assignment]
        input_globals = observe_input_globals(graph, schemes)
        target: Callable[[Sequence[str]], StackTarget] | None = None
        if p.input_feedback:
            accs, crosses, paired = collect_paired_hessians(graph, input_globals.stats, names=schemes)
            parts = solve_parts(layer, graph, accs, schemes, calib.world, calib.expert_owner)
            hessians_to_owners(parts, calib.world, accs, crosses)
            calib.observe_paired(paired, later=later)

            def feedback(stack: Sequence[str]) -> StackTarget:  # on the owner rank, within its solve
                op = feedback_operator(accs[stack[0]].hessian(), crosses[stack[0]].hessian(), p.dampening_frac,
                                       act_order=p.act_order, name="+".join(stack))
                return StackTarget([op.apply(graph.unit(n).matrix(layer)) for n in stack], op.upper)

            target = feedback
        else:
            accs, stats = collect_hessians(graph, input_globals.stats, names=schemes)
            parts = solve_parts(layer, graph, accs, schemes, calib.world, calib.expert_owner)
            hessians_to_owners(parts, calib.world, accs)
            calib.observe(stats, later=later)
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
