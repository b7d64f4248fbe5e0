"""GPTQ's column loop two ways on real layer shapes: the torch loop (about ten kernels a column,
captured as a CUDA graph per block) and the Triton kernel (one launch per 128-column block),
each a whole ``gptq_quantize_batch`` (W4 g128 sym, act-order with static groups, the bench's
GPTQ), with the codes' agreement and each one's output error ``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` relative
to the torch loop's. Also: the kernel's rows per program.

    python benchmarks/gptq_column_loop.py          # on a CUDA machine; prints one table
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.quantizers import gptq_block_kernel  # noqa: E402
from quantkit.quantizers.gptq import gptq_quantize_batch  # noqa: E402
from quantkit.scheme import Scheme, WeightScheme  # noqa: E402

# name: (weights, rows, in_features, one Hessian for all)
SHAPES = {
    "Mixtral-8x7B w2 x8 (own Hessians)": (8, 4096, 14336, False),
    "Mixtral-8x7B w1+w3 x8 (one Hessian)": (8, 28672, 4096, True),
    "Qwen3-30B-A3B down x128": (128, 2048, 768, False),
    "Llama-3.1-70B down_proj": (1, 8192, 28672, False),
    "Llama-3.1-70B q+k+v": (1, 10240, 8192, False),
}
SCHEME = Scheme(WeightScheme(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True))
OPTIONS = dict(act_order=True, static_groups=True)


def _problem(e: int, rows: int, n: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(e, rows, n, device="cuda", generator=g) * 0.02
    hs = []
    for _ in range(1 if shared else e):
        x = torch.randn(n // 2 + 256, n, device="cuda", generator=g) * torch.rand(n, device="cuda", generator=g)
        h = x.T @ x / x.shape[0]
        hs.append(h)
    return w, torch.stack(hs)


def _run(w: torch.Tensor, h: torch.Tensor, triton: bool) -> tuple[float, list]:
    os.environ["QUANTKIT_TRITON"] = "1" if triton else "0"
    gptq_quantize_batch(w[:1, :64], h[:1], SCHEME, **OPTIONS)  # compile / capture out of the timing
    torch.cuda.synchronize()
    best, out = float("inf"), None
    for _ in range(2):
        t = time.perf_counter()
        out = gptq_quantize_batch(w, h, SCHEME, **OPTIONS)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def _error(w: torch.Tensor, h: torch.Tensor, qs: list) -> float:
    total = 0.0
    for e, q in enumerate(qs):
        d = w[e] - q.dequantize().to(w.dtype)
        total += float(((d @ h[min(e, h.shape[0] - 1)]) * d).sum())
    return total


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    t = time.perf_counter()
    w, h = _problem(1, 64, 256, True)
    _run(w, h, True)
    print(f"first launch (Triton compile, or its cache): {time.perf_counter() - t:.2f} s\n")
    print("| shape | torch loop s | Triton kernel s | ratio | codes equal | output error, kernel / torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (e, rows, n, shared) in SHAPES.items():
        w, h = _problem(e, rows, n, shared)
        t_torch, q_torch = _run(w, h, False)
        t_kernel, q_kernel = _run(w, h, True)
        same = sum(int((a.codes == b.codes).sum()) for a, b in zip(q_torch, q_kernel)) / w.numel()
        ratio = _error(w, h, q_kernel) / _error(w, h, q_torch)
        print(f"| {name} | {t_torch:.3f} | {t_kernel:.3f} | {t_kernel / t_torch:.2f}x | {same:.5f} | {ratio:.4f} |",
              flush=True)
        del w, h, q_torch, q_kernel
        torch.cuda.empty_cache()
    w, h = _problem(8, 4096, 14336, False)
    print("\nrows per program (Mixtral w2 x8):", end="")
    for rows in (16, 32, 64):
        gptq_block_kernel.ROWS_PER_PROGRAM = rows
        print(f"  {rows}: {_run(w, h, True)[0]:.3f} s", end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
