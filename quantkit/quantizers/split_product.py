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


def split_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for float32 ``a`` ``[m, k]`` and ``b`` ``[k, n]``, in float32 (into ``out``, a
    ``[m, n]`` view, when given)."""
    b_hi, b_lo = _split(b)
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    rows = max(1, -(-a.shape[0] // CHUNKS))
    for r in range(0, a.shape[0], rows):
        a_hi, a_lo = _split(a[r:r + rows])
        part = _product(a_hi, b_hi)
        part += _product(a_hi, b_lo)
        part += _product(a_lo, b_hi)
        out[r:r + rows] = part
    return out


BLOCK = 2048
"""Side of the blocks ``upper_blocks_product`` skips or computes on the CPU."""
CUDA_BLOCK = 4096
"""The same on a GPU, where each block's products must also keep the tensor cores busy (three
per block). One H200 (``benchmarks/feedback_target_speed.py``), GPTAQ's operator 14336 wide:
0.16–0.18 s in blocks of 2048, 0.14 s in blocks of 4096 or 8192, 0.16 s as full products;
28672 wide: 0.95–0.99, 0.84, 0.84 and 1.05 s."""


def upper_blocks_product(a: torch.Tensor, b: torch.Tensor, a_upper: bool = False, b_lower: bool = False,
                         b_upper: bool = False) -> torch.Tensor:
    """The blocks of ``a @ b`` (``[n, n]``, float32 by ``split_product``, float64 exactly) on and
    above its block diagonal, those below it zero (one block, ``n`` ≤ ``BLOCK`` or, on a GPU,
    ``CUDA_BLOCK``: the full product), with the products against ``a``'s or ``b``'s zero blocks
    skipped: ``a`` upper triangular (``a_upper``), ``b`` lower or upper triangular. GPTAQ's two products need only
    those blocks of such factors: about a fifth of the full products' work at 14336 wide and
    above."""
    n = a.shape[0]
    side = CUDA_BLOCK if a.is_cuda else BLOCK
    if n <= side:  # one block: the full product
        return split_product(a, b) if a.dtype == torch.float32 else a @ b
    out = torch.zeros(n, n, dtype=a.dtype, device=a.device)
    for i in range(0, n, side):
        for j in range(i, n, side):
            lo = max(i if a_upper else 0, j if b_lower else 0)
            hi = min(j + side, n) if b_upper else n
            block = out[i:i + side, j:j + side]
            if a.dtype == torch.float32:
                split_product(a[i:i + side, lo:hi], b[lo:hi, j:j + side], out=block)
            else:
                block.copy_(a[i:i + side, lo:hi] @ b[lo:hi, j:j + side])
    return out
