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

# Row chunks bound the [groups, rows, in] temporaries to about this many elements (128 MiB).
_CHUNK_ELEMS = 1 << 25


def _normal_equations(w: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M[r, g, k] = a_{r,g}ᵀ H_{gk} a_{r,k}`` and ``b[r, g] = a_{r,g}ᵀ (H w_r)_g`` for
    the per-row, per-group vectors ``a`` ``[rows, G, gs]``: the normal equations of the scales,
    ``M s = b``. One batched product of ``rows × in²`` multiply-adds, as one GPTQ column loop."""
    rows, n_g, gs = a.shape
    in_f = n_g * gs
    by_group = h.view(n_g, gs, in_f)
    m = torch.empty(rows, n_g, n_g, dtype=h.dtype, device=h.device)
    b = torch.empty(rows, n_g, dtype=h.dtype, device=h.device)
    step = max(1, _CHUNK_ELEMS // (n_g * in_f))
    for r in range(0, rows, step):
        ar = a[r : r + step]
        v = torch.bmm(ar.transpose(0, 1), by_group)  # [G, chunk, in]: a_{r,g}ᵀ H_{g,:}
        m[r : r + step] = torch.einsum("grkj,rkj->rgk", v.view(n_g, -1, n_g, gs), ar)
        b[r : r + step] = torch.bmm(v.transpose(0, 1), w[r : r + step].unsqueeze(2)).squeeze(2)
    return m, b


def refit_scales(w: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor, dampening_frac: float = 0.01
                 ) -> QuantizedWeight:
    """``qw`` (integer codes of ``w`` ``[out, in]``, group or per-channel scales, natural group
    order) with its scales refitted to the codes under ``hessian`` ``[in, in]`` (the one the
    codes were chosen with); codes and zero points are kept. The systems use the Hessian damped
    as GPTQ damps it (``dampening_frac`` of its mean diagonal), so a group with nearly
    dependent inputs cannot get a wild scale; a row keeps its refit only where that lowers its
    undamped error ``(w − ŵ)ᵀ H (w − ŵ)`` and all its scales stay positive. A group whose codes
    all sit on the zero point does not depend on its scale and keeps it.

    The products run in float32 (as GPTQ's), the ``G × G`` solves in float64; the error
    change is taken from the difference of the two weights, where float32 loses nothing.
    """
    ws = qw.scheme.weights
    if ws.type != "int" or ws.strategy not in ("group", "channel") or qw.g_idx is not None:
        raise ValueError(f"scale refit needs int codes with group or per-channel scales in natural order, not "
                         f"{ws.type} {ws.strategy}{' with g_idx' if qw.g_idx is not None else ''}")
    rows, in_f = qw.shape
    f32 = dict(dtype=torch.float32, device=qw.codes.device)
    # An input that was always zero has a zero row and column in H: it drops out of the error,
    # and the damping keeps the systems positive definite.
    h = hessian.to(**f32)
    w32 = w.to(**f32)
    n_g = qw.scale.shape[1]
    a = qw.codes.to(**f32).view(rows, n_g, in_f // n_g)
    if qw.zero_point is not None:
        a = a - qw.zero_point.to(**f32).unsqueeze(-1)
    m, b = (t.double() for t in _normal_equations(w32, a, h))
    # Damping H by λI adds λ‖a_g‖² to M's diagonal and λ a_g·w_g to b.
    damp = dampening_frac * h.diagonal().double().mean()
    m.diagonal(dim1=1, dim2=2).add_(damp * (a * a).sum(-1).double())
    b += damp * (a * w32.view(rows, n_g, -1)).sum(-1).double()
    s0 = qw.scale.to(torch.float64)
    empty = (a == 0).all(-1)
    m.diagonal(dim1=1, dim2=2).masked_fill_(empty, 1.0)
    b = torch.where(empty, s0, b)
    low, info = torch.linalg.cholesky_ex(m)
    s = torch.cholesky_solve(b.unsqueeze(-1), low).squeeze(-1)
    keep = (info == 0) & torch.isfinite(s).all(1) & (s > 0).all(1)
    s = torch.where(keep.unsqueeze(1), s, s0).to(torch.float32)
    # error after − before = dᵀ H (d − 2 e₀), with e₀ = w − ŵ₀ and d = ŵ₁ − ŵ₀ per row
    e0 = w32 - (a * qw.scale.to(**f32).unsqueeze(-1)).view(rows, in_f)
    d = (a * (s - qw.scale.to(**f32)).unsqueeze(-1)).view(rows, in_f)
    keep &= ((d @ h) * (d - 2 * e0)).sum(1) < 0
    return replace(qw, scale=torch.where(keep.unsqueeze(1), s, qw.scale.to(**f32)).to(qw.scale.dtype))
