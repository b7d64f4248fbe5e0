"""Where a MoE layer's batched GPTQ solve spends its time: ``gptq_quantize_batch`` on random
weights and Hessians of a real expert shape, timed by parts (synchronised wall clock) and by
the profiler's busiest kernels.

    python benchmarks/gptq_solve_profile.py                      # Mixtral-8x7B's experts on the GPU
    python benchmarks/gptq_solve_profile.py --shape qwen3-30b-a3b --device cpu --scale 0.125

Each solve is what a run gives it for W4A16 g128 with static act-order (the benchmark's GPTQ
recipe): the experts' down_proj, each with its own Hessian, and gate/up as one stack sharing one
Hessian (all-expert calibration feeds every expert every token). A warm-up solve first (CUDA
graph capture, cuSOLVER handles), then one timed solve per stack. Prints one table per stack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # quantkit from this checkout

from quantkit.presets import PRESETS  # noqa: E402
from quantkit.quantizers import gptq  # noqa: E402

# experts, hidden, expert intermediate
SHAPES = {"mixtral-8x7b": (8, 4096, 14336), "qwen3-30b-a3b": (128, 2048, 768), "deepseek-v3": (256, 7168, 2048)}


def hessians(n: int, width: int, tokens: int, device: str, seed: int) -> torch.Tensor:
    """``n`` Hessians ``XᵀX / tokens`` of random inputs with a few loud channels, as real ones have."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, width, width, device=device)
    loud = torch.ones(width, device=device)
    loud[torch.randperm(width, generator=g, device=device)[: width // 64]] = 8.0
    for e in range(n):
        x = torch.randn(tokens, width, generator=g, device=device) * loud
        out[e] = x.T @ x / tokens
    return out


class Parts:
    """Synchronised wall time of named functions inside the solve."""

    def __init__(self, device: str):
        self.seconds: dict[str, float] = {}
        self.on = False  # off during the warm-up: a sync inside CUDA graph capture is an error
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="widths x this (a CPU check of the script)")
    ap.add_argument("--experts", type=int, default=0, help="experts in a stack (0: the shape's)")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    n, hidden, inter = SHAPES[args.shape]
    n = args.experts or n
    hidden, inter = (max(128, int(w * args.scale) // 128 * 128) for w in (hidden, inter))
    dev = args.device
    opts = dict(act_order=True, static_groups=True)
    scheme = PRESETS["W4A16"]
    stacks = {  # name: (weights [E, out, in], Hessians [E or 1, in, in])
        f"down_proj x{n} ({hidden}x{inter}, own Hessians)": lambda: (
            torch.randn(n, hidden, inter, device=dev) * 0.02, hessians(n, inter, args.tokens, dev, 1)),
        f"gate+up x{2 * n} ({inter}x{hidden}, one Hessian)": lambda: (
            torch.randn(2 * n, inter, hidden, device=dev) * 0.02, hessians(1, hidden, args.tokens, dev, 2)),
    }
    parts = Parts(dev)
    parts.wrap(gptq, "_inverse_hessian_factor", "Hessian factor")
    parts.wrap(gptq, "clip_to_gram", "clip search")
    parts.wrap(gptq, "weight_qparams", "up-front group scales")
    parts.wrap(gptq, "_subtract_product", "error propagation (batched matmuls)")
    parts.wrap(gptq, "_block_graph", "block graph lookup/capture")
    print(f"{args.shape} on {dev}, W4A16 g128, static act-order\n| stack | total s | parts: s |\n|---|---|---|")
    for label, make in stacks.items():
        w, h = make()
        parts.on = False
        gptq.gptq_quantize_batch(w, h, scheme, **opts)  # warm-up: graph capture, cuSOLVER handles
        parts.seconds.clear()
        parts.on = True
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        gptq.gptq_quantize_batch(w, h, scheme, **opts)
        if dev == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t
        shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.seconds.items(), key=lambda kv: -kv[1]))
        print(f"| {label} | {total:.3f} | {shown}; rest {total - sum(parts.seconds.values()):.3f} |")
        del w, h
    return 0


if __name__ == "__main__":
    sys.exit(main())
