"""Clipping search: shrink each group's range where that lowers its output error.

Round-to-nearest with the min-max range spends grid points on rare large weights; a smaller
range rounds the rest more finely and clips the few. Which is better depends on the inputs,
so each (row, group) picks the shrink factor minimising its RTN error under the group's
Gram block of the inputs (AWQ's clip search; GPTQ's static group scales with ``clip_search``).
"""

from __future__ import annotations

import torch

from ..grids import effective_scale, round_to_grid
from ..scheme import Scheme
from .rtn import range_qparams, weight_global_scale

# Chunk sizes bound temporary buffers to about this many float32 elements (128 MiB).
_CHUNK_ELEMS = 1 << 25
MAX_SHRINK = 0.5


def _clamp_groups(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``wg`` ``[rows, ng, g]`` with each (row, group) clamped to its ``[lo, hi]`` ``[rows, ng]``."""
    return torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1))


def group_grams(hessian: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal ``[g, g]`` blocks of a ``[in, in]`` Hessian, ``[in/g, g, g]``."""
    ng = hessian.shape[0] // g
    return hessian.reshape(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _rtn_error(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme,
               gs: torch.Tensor | None) -> torch.Tensor:
    """``w − RTN(clamp(w, lo, hi))`` for ``w`` ``[rows, ng, g]`` and each (row, group)'s range
    ``[lo, hi]`` ``[rows, ng]`` (``gs``: the clamped weight's global scale, if its scheme has
    one): what ``quantize_rtn(...).dequantize()`` gives the clamped weight, its scale and zero
    point taken from the range (the clamped group's own min and max) and broadcast over the
    group instead of expanded to the weight's shape."""
    ws = scheme.weights
    wc = _clamp_groups(w, lo, hi)
    scale, zero = range_qparams(lo, hi, ws, gs)
    step = effective_scale(scale, gs).unsqueeze(-1)
    x = wc.div_(step)
    if zero is not None:
        x.add_(zero.to(torch.float32).unsqueeze(-1))
    q = round_to_grid(x, ws.grid)
    if zero is not None:
        q.sub_(zero.to(torch.float32).unsqueeze(-1))
    return torch.sub(w, q.mul_(step), out=q)


def clip_to_gram(
    w: torch.Tensor, gram: torch.Tensor, scheme: Scheme, grid: int = 20, max_shrink: float = MAX_SHRINK
) -> torch.Tensor:
    """``w`` (float32) with each (row, group) clamped to the shrunk range ``r·[min, max]``,
    ``r ∈ {1, 1−1/grid, …} ≥ 1 − max_shrink``, that minimises ``Δwᵀ G Δw`` of its RTN error
    under that group's Gram block ``G`` (``gram`` ``[in/g, g, g]``): groups are scored
    independently, the cross-group terms of the output error left out.

    A shrink's error is computed in the groups' own shape (``_rtn_error``): about a third of
    the passes over the weight that rounding the clamped weight with ``quantize_rtn`` took,
    the same values."""
    ws = scheme.weights
    w = w.detach().to(torch.float32)
    out_f, in_f = w.shape
    ng = gram.shape[0]
    g = in_f // ng
    wg = w.reshape(out_f, ng, g)
    if ws.symmetric:
        hi0 = wg.abs().amax(-1)
        lo0 = -hi0
    else:
        hi0 = wg.amax(-1).clamp_min(0)
        lo0 = wg.amin(-1).clamp_max(0)
    best_loss = torch.full((out_f, ng), float("inf"), device=w.device)
    best_r = torch.ones(out_f, ng, device=w.device)
    row_chunk = max(1, _CHUNK_ELEMS // in_f)
    for i in range(int(max_shrink * grid)):
        r = 1.0 - i / grid
        loss = torch.empty(out_f, ng, device=w.device)
        # the clamped weight's largest magnitude is its largest range end
        gs = weight_global_scale([torch.maximum(hi0 * r, -(lo0 * r))], ws)
        for o in range(0, out_f, row_chunk):
            rows = slice(o, o + row_chunk)
            d = _rtn_error(wg[rows], lo0[rows] * r, hi0[rows] * r, scheme, gs).transpose(0, 1)  # [ng, rows, g]
            loss[rows] = ((d @ gram) * d).sum(-1).transpose(0, 1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return _clamp_groups(wg, lo0 * best_r, hi0 * best_r).reshape(out_f, in_f)
