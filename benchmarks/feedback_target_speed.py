"""GPTAQ's feedback target at Llama-3.1-8B and 70B widths: quantkit's (float32, bf16-split
products of the blocks on and above the diagonal) against the same arithmetic in float64
(quantkit's before stop 35: float64 statistics take that path), with the full bf16-split
products (stop 35), in float32 with exact products and in float32 with TF32 products.

    python benchmarks/feedback_target_speed.py            # on the GPU

Prints, per width, the seconds of one target and its error against the float64 one: the
relative error of the correction ``W' - W`` and the share of W4 g64 asymmetric
round-to-nearest codes of ``W'`` that differ from the float64 target's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.quantizers import gptq, split_product  # noqa: E402
from quantkit.quantizers.hessian import HessianAccumulator  # noqa: E402


def hessians(n: int, tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``X̃ᵀX̃`` and ``X̃ᵀX`` of correlated, unevenly scaled inputs and a float stream 5% away."""
    g = torch.Generator(device=device).manual_seed(0)
    mix = torch.randn(n, n, generator=g, device=device) / n ** 0.5 + torch.eye(n, device=device)
    scales = torch.exp(torch.randn(n, generator=g, device=device))
    h, c = HessianAccumulator(), HessianAccumulator()
    for _ in range(tokens // 4096):
        xf = (torch.randn(4096, n, generator=g, device=device) @ mix) * scales
        xq = xf + 0.05 * torch.randn(4096, n, generator=g, device=device) * scales
        h.add(xq.bfloat16())
        c.add(xq.bfloat16(), xf.bfloat16())
    return h.hessian(), c.hessian()


def with_product(product, run, block: int | None = None):
    """``run()`` with feedback_operator's float32 products made by ``product`` (None: quantkit's
    own), of blocks ``block`` wide on the GPU (None: quantkit's; wider than the matrix: one full
    product)."""
    saved = split_product.split_product, split_product.CUDA_BLOCK

    def into(a, b, out=None):
        if out is None:
            return product(a, b)
        return out.copy_(product(a, b))

    if product is not None:
        split_product.split_product = into
    split_product.CUDA_BLOCK = block or saved[1]
    try:
        return run()
    finally:
        split_product.split_product, split_product.CUDA_BLOCK = saved


def tf32_product(a, b):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def codes(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, 64)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    return torch.clamp(torch.round(g / scale) + zero, 0, 15)


def timed(fn, reps=2):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps, out


def main() -> None:
    dev = "cuda"
    print("| in | out | variant | s | rel. error of W'-W | codes differing |")
    print("|---:|---:|---|---:|---:|---:|")
    for n, out in ((4096, 6144), (14336, 4096), (28672, 8192)):
        h, c = hessians(n, 32768, dev)
        w = torch.randn(out, n, device=dev) * 0.02
        s_ref, ref = timed(lambda: gptq.feedback_target(w.double(), h.double(), c.double(), 0.01, act_order=True))
        ref_codes = codes(ref)

        def target():
            return gptq.feedback_target(w, h, c, 0.01, act_order=True)

        whole = 1 << 30
        rows = (("float64 (quantkit before)", lambda: (s_ref, ref)),
                ("float32, bf16-split products of the upper blocks (quantkit)", lambda: timed(target)),
                *((f"float32, bf16-split products of the upper blocks, {b} wide",
                   lambda b=b: with_product(None, lambda: timed(target), b)) for b in (2048, 8192)),
                ("float32, full bf16-split products (stop 35)",
                 lambda: with_product(None, lambda: timed(target), whole)),
                ("float32", lambda: with_product(torch.matmul, lambda: timed(target), whole)),
                ("float32, TF32 products", lambda: with_product(tf32_product, lambda: timed(target), whole)))
        for name, run in rows:
            s, got = run()
            rel = ((got - ref).norm() / (ref - w).norm()).item()
            diff = (codes(got) != ref_codes).float().mean().item()
            print(f"| {n} | {out} | {name} | {s:.3f} | {rel:.2e} | {diff:.2e} |", flush=True)
        del h, c, w, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
