"""GPTQ's inverse-Hessian factor for a stack of Hessians, three ways: the stack in one call
(cuSOLVER's batched Cholesky), one matrix at a time, and one matrix at a time spread over a few
CUDA streams, on the shapes of real MoE layers.

    python benchmarks/hessian_factor.py          # on a CUDA machine; prints one table
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.quantizers.gptq import upper_inverse_factor  # noqa: E402

T, R = TypeVar("T"), TypeVar("R")

SHAPES = {"Mixtral-8x7B down_proj x8": (8, 14336), "Llama-4 down_proj x16 (8192 wide)": (16, 8192),
          "x16 of 6144": (16, 6144), "x16 of 4096": (16, 4096), "DeepSeek-V3 down_proj x64": (64, 2048),
          "Qwen3-30B-A3B down_proj x128": (128, 768), "Llama-3.1-70B down_proj x1": (1, 28672),
          "one 4096 (attention)": (1, 4096)}


def _hessians(e: int, n: int) -> torch.Tensor:
    x = torch.randn(e, n, n // 2 + 64, device="cuda")
    h = x @ x.transpose(1, 2) / x.shape[-1]
    h.diagonal(dim1=1, dim2=2).add_(0.01)
    return h


def best_of_three(fn: Callable[[T], R], arg: T, warm: T) -> tuple[float, R]:
    """The fastest of three timed calls ``fn(arg)`` on the GPU and the last's result, after one
    call ``fn(warm)`` that takes the first-call costs out."""
    fn(warm)
    torch.cuda.synchronize()
    best, out = float("inf"), None
    for _ in range(3):
        t = time.perf_counter()
        out = fn(arg)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def stacked(h: torch.Tensor) -> torch.Tensor:
    return upper_inverse_factor(h)[0]


def one_by_one(h: torch.Tensor) -> torch.Tensor:
    return torch.stack([upper_inverse_factor(h[e:e + 1])[0][0] for e in range(h.shape[0])])


def on_streams(h: torch.Tensor, k: int = 4) -> torch.Tensor:
    out = torch.empty_like(h)
    streams = [torch.cuda.Stream() for _ in range(k)]
    here = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(here)
    for e in range(h.shape[0]):
        with torch.cuda.stream(streams[e % k]):
            out[e] = upper_inverse_factor(h[e:e + 1])[0][0]
    for s in streams:
        here.wait_stream(s)
    return out


def main() -> None:
    print("| stack | in one call s | one at a time s | on 4 streams s | max diff vs one call |")
    print("|---|---:|---:|---:|---:|")
    for name, (e, n) in SHAPES.items():
        h = _hessians(e, n)
        a, ua = best_of_three(stacked, h, h[:1].clone())
        b, ub = best_of_three(one_by_one, h, h[:1].clone())
        c, uc = best_of_three(on_streams, h, h[:1].clone())
        scale = ua.abs().max()
        diff = max(float((ub - ua).abs().max() / scale), float((uc - ua).abs().max() / scale))
        print(f"| {name} | {a:.3f} | {b:.3f} | {c:.3f} | {diff:.1e} |")
        del h, ua, ub, uc
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
