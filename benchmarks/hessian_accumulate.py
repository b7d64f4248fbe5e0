"""The Hessian accumulation on CUDA at Llama-3.1-8B and 70B widths: quantkit's one fused
``addmm`` into the float32 running mean against the product, scale and add it replaced.

    python benchmarks/hessian_accumulate.py       # on the GPU; prints one table

Per width: seconds to fold in 32 batches of 2048 bf16 tokens, and each way's largest error
against the float64 mean relative to its largest entry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hessian_factor import best_of_three  # noqa: E402  (this script's folder is on the path)
from quantkit.quantizers.hessian import HessianAccumulator  # noqa: E402

WIDTHS = (4096, 8192, 14336, 28672)
BATCHES, TOKENS = 32, 2048


def unfused(xs: list[torch.Tensor]) -> torch.Tensor:
    """The accumulation before: a float32 product, then the mean rescaled and the product added."""
    h, n = torch.zeros(xs[0].shape[1], xs[0].shape[1], device="cuda"), 0
    for x in xs:
        t = n + x.shape[0]
        h.mul_(n / t).add_(torch.mm(x.T, x, out_dtype=torch.float32), alpha=2.0 / t)
        n = t
    return h


def fused(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = HessianAccumulator()
    for x in xs:
        acc.add(x)
    return acc.hessian()


def main() -> None:
    print("| in | product, scale, add (before) s | fused addmm (quantkit) s | speed-up | error before | error now |")
    print("|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in WIDTHS:
        xs = [torch.randn(TOKENS, n, generator=g, device="cuda").bfloat16() for _ in range(BATCHES)]
        want = torch.zeros(n, n, device="cuda", dtype=torch.float64)
        for x in xs:
            want.addmm_(x.T.double(), x.double())
        want.mul_(2.0 / (BATCHES * TOKENS))
        t0, h0 = best_of_three(unfused, xs, xs[:2])
        t1, h1 = best_of_three(fused, xs, xs[:2])
        scale = want.abs().max()
        e0, e1 = ((h - want).abs().max() / scale for h in (h0.double(), h1.double()))
        print(f"| {n} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}x | {e0:.1e} | {e1:.1e} |", flush=True)
        del xs, want, h0, h1
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
