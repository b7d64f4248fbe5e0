"""Refit group scales once the integer codes are fixed.

GPTQ picks each group's scale and zero point before its column loop (min-max or the clip
search) and then chooses the codes ``q`` against them. Given the codes, the dequantized row
``ŵ_j = s_g (q_j − z_g)`` is linear in the scales, so the scales minimising the row's output
error under the layer's Hessian, ``(w − ŵ)ᵀ H (w − ŵ)``, solve a ``G × G`` linear system per
row (``G`` groups), batched over the rows; a row keeps its refit only where it lowers its error.

Zero points stay: fitting the offsets ``t_g = −s_g z_g`` jointly with the scales moves the
continuous zero point by a small fraction of a code (SmolLM2 layers, W4 g64 asym: rounded back
onto the integer grid the formats store, not one zero point changed), so the joint fit pays
nothing once rounded.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..scheme import QuantizedWeight

# Row chunks bound the [rows, in] temporaries to about this many elements.
_CHUNK_ELEMS = 1 << 24


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``(w − ŵ)ᵀ H (w − ŵ)`` per row of ``[out, in]`` weights, float64 ``[out]``."""
    h = hessian.to(torch.float64)
    out = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    step = max(1, _CHUNK_ELEMS // w.shape[1])
    for r in range(0, w.shape[0], step):
        e = w[r : r + step].to(torch.float64) - w_hat[r : r + step].to(torch.float64)
        out[r : r + step] = ((e @ h) * e).sum(1)
    return out


def _block_grams(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``M[r, g, k] = a_{r,g}ᵀ H_{gk} b_{r,k}`` for per-row, per-group vectors ``a``, ``b``
    ``[rows, G, gs]``: the normal equations' matrix of a design with one column per group."""
    rows, n_g, gs = a.shape
    out = torch.empty(rows, n_g, n_g, dtype=h.dtype, device=h.device)
    step = max(1, _CHUNK_ELEMS // (n_g * gs))
    for r in range(0, rows, step):
        ar, br = a[r : r + step], b[r : r + step]
        for g in range(n_g):
            v = ar[:, g] @ h[g * gs : (g + 1) * gs]  # [chunk, in]
            out[r : r + step, g] = (v.view(-1, n_g, gs) * br).sum(-1)
    return out


def _solve(m: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solutions of the symmetric systems ``m x = rhs`` (``[rows, n, n]``, ``[rows, n]``) and
    which rows were positive definite enough to solve."""
    low, info = torch.linalg.cholesky_ex(m)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), low).squeeze(-1)
    return x, (info == 0) & torch.isfinite(x).all(1)


def _fit_scales(w: torch.Tensor, a: torch.Tensor, h: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """Scales ``[rows, G]`` minimising ``(w − ŵ)ᵀ H (w − ŵ)`` with ``ŵ_{g,i} = s_g a_{g,i}``
    (``a`` ``[rows, G, gs]``: codes minus zero points). A group whose ``a`` is all zero does not
    depend on its scale, which keeps ``s0``; rows that cannot be solved keep ``s0`` whole."""
    rows, n_g, gs = a.shape
    m = _block_grams(a, a, h)
    rhs = ((w @ h).view(rows, n_g, gs) * a).sum(-1)
    empty = (a == 0).all(-1)
    m.diagonal(dim1=1, dim2=2).masked_fill_(empty, 1.0)
    rhs = torch.where(empty, s0, rhs)
    s, ok = _solve(m, rhs)
    return torch.where(ok.unsqueeze(1), s, s0)


def refit_scales(w: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor, dampening_frac: float = 0.01
                 ) -> QuantizedWeight:
    """``qw`` (integer codes of ``w`` ``[out, in]``, group or per-channel scales, natural group
    order) with its scales refitted to the codes under ``hessian`` ``[in, in]`` (the one the
    codes were chosen with); codes and zero points are kept. The systems use the Hessian damped
    as GPTQ damps it (``dampening_frac`` of its mean diagonal), so a group with nearly
    dependent inputs cannot get a wild scale; a row keeps its refit only where that lowers its
    undamped error and all its scales stay positive. Computed in float64."""
    ws = qw.scheme.weights
    if ws.type != "int" or ws.strategy not in ("group", "channel") or qw.g_idx is not None:
        raise ValueError(f"scale refit needs int codes with group or per-channel scales in natural order, not "
                         f"{ws.type} {ws.strategy}{' with g_idx' if qw.g_idx is not None else ''}")
    rows, in_f = qw.shape
    f64 = dict(dtype=torch.float64, device=qw.codes.device)
    h = hessian.to(**f64)
    dead = h.diagonal() == 0  # as GPTQ: an input that was always zero cannot matter
    h_damped = h.clone()
    h_damped.diagonal().masked_fill_(dead, 1.0).add_(dampening_frac * h_damped.diagonal().mean())
    w64 = w.to(**f64).masked_fill(dead, 0.0)
    n_g = qw.scale.shape[1]
    a = qw.codes.to(**f64).view(rows, n_g, in_f // n_g)
    if qw.zero_point is not None:
        a = a - qw.zero_point.to(**f64).unsqueeze(-1)
    s0 = qw.scale.to(torch.float64)
    s = _fit_scales(w64, a, h_damped, s0)
    before = proxy_loss(w64, (a * s0.unsqueeze(-1)).view(rows, in_f), h)
    after = proxy_loss(w64, (a * s.unsqueeze(-1)).view(rows, in_f), h)
    keep = (after < before) & (s > 0).all(1)
    scale = torch.where(keep.unsqueeze(1), s, s0).to(qw.scale.dtype)
    return replace(qw, scale=scale)
