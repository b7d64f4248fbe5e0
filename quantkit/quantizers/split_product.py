"""Float32 matrix products on bf16 tensor cores, for the wide [in, in] products of GPTAQ's target.

A GPU's float32 and float64 units multiply at the same rate (67 TFLOPS on an H200), its bf16
tensor cores at ten times that. Each float32 operand is split into a bf16 high part and the
bf16-rounded remainder, ``a ≈ a_hi + a_lo`` to 16 bits of mantissa, and three products are
accumulated in float32: ``a_lo b_lo`` and the remainders' own rounding, left out, are about
2⁻¹⁷ of each term. Measured on GPTAQ's targets (one H200, 4096 to 28672 wide): 2e-5 to 8e-5 of
the correction, where TF32's products give 1e-3 (``benchmarks/feedback_target_speed.py``).

The CPU computes the same split with float32 products, so the tests there check the GPU's
arithmetic; its products take a float32 copy of a half of ``b`` at a time, one ``[k, n]``
matrix more than the GPU's.
"""

from __future__ import annotations

import torch

CHUNKS = 8
"""``a`` is split an eighth of its rows at a time, so its split and the partial products stay
small beside ``b``'s split (one float32 matrix's bytes in two bf16 halves) and the output."""


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high = t.to(torch.bfloat16)
    return high, (t - high.float()).to(torch.bfloat16)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def split_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for float32 ``a`` ``[m, k]`` and ``b`` ``[k, n]``, in float32."""
    b_hi, b_lo = _split(b)
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    rows = max(1, -(-a.shape[0] // CHUNKS))
    for r in range(0, a.shape[0], rows):
        a_hi, a_lo = _split(a[r:r + rows])
        part = _product(a_hi, b_hi)
        part += _product(a_hi, b_lo)
        part += _product(a_lo, b_hi)
        out[r:r + rows] = part
    return out
