"""What a fresh process pays the first time it calls each kind of device work quantkit's
engine uses (library loads, handles, lazily loaded kernels), against the second call: the
most a warm-up beside validation could hide from the first layer.

    python benchmarks/cold_start.py          # on a CUDA machine; prints one table
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _ops(device: torch.device) -> dict:
    a = torch.randn(512, 512, device=device)
    h = a @ a.T + 512 * torch.eye(512, device=device)
    q128 = torch.randn(1, 8, 256, 128, device=device, dtype=torch.bfloat16)
    q64 = torch.randn(1, 8, 256, 64, device=device, dtype=torch.bfloat16)

    def attention(q: torch.Tensor, backend: SDPBackend):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    w = torch.randn(4, 256, 128, device=device, dtype=torch.bfloat16)
    x = torch.randn(64, 256, device=device, dtype=torch.bfloat16)
    offs = torch.tensor([16, 32, 48, 64], device=device, dtype=torch.int32)
    return {
        "float32 matmul": lambda: a @ a,
        "bfloat16 matmul": lambda: a.bfloat16() @ a.bfloat16(),
        "cholesky (cuSOLVER)": lambda: torch.linalg.cholesky(h),
        "triangular solve": lambda: torch.linalg.solve_triangular(torch.linalg.cholesky(h), a, upper=False),
        "batched matmul": lambda: torch.bmm(a.expand(4, -1, -1), a.expand(4, -1, -1)),
        "attention, flash, head 128": lambda: attention(q128, SDPBackend.FLASH_ATTENTION),
        "attention, flash, head 64 (after 128)": lambda: attention(q64, SDPBackend.FLASH_ATTENTION),
        "attention, memory-efficient, head 128": lambda: attention(q128, SDPBackend.EFFICIENT_ATTENTION),
        "attention, cuDNN, head 128": lambda: attention(q128, SDPBackend.CUDNN_ATTENTION),
        "grouped matmul": lambda: torch._grouped_mm(x, w, offs=offs),
        "top-k + softmax": lambda: torch.topk(a.softmax(-1), 8, dim=-1),
        "pinned copy to host": lambda: torch.empty(a.shape, pin_memory=True).copy_(a, non_blocking=True),
        **_gptq_kernel(device),
    }


def _gptq_kernel(device: torch.device) -> dict:
    """GPTQ's Triton column kernel: compiled on its first call on a machine (Triton's cache,
    ``~/.triton/cache``, empty), loaded from that cache in every later process."""
    from quantkit.quantizers import gptq_block_kernel

    if not gptq_block_kernel.available(device):
        return {}
    w = torch.randn(8, 4096, 128, device=device)
    u = torch.eye(128, device=device).unsqueeze(0)
    s = torch.full_like(w, 0.1)
    return {"GPTQ Triton column kernel": lambda: gptq_block_kernel.quantize_block(w, u, s, None, -8.0, 7.0)}


def main() -> None:
    device = torch.device("cuda")
    t = time.perf_counter()
    torch.cuda.init()
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
    print(f"context: {time.perf_counter() - t:.3f} s")
    print("| op | first call s | second call s |\n|---|---:|---:|")
    total = 0.0
    for name, op in _ops(device).items():
        times = []
        for _ in range(2):
            t = time.perf_counter()
            try:
                op()
                torch.cuda.synchronize()
            except (RuntimeError, AttributeError) as e:
                print(f"| {name} | failed: {e} | |")
                break
            times.append(time.perf_counter() - t)
        if len(times) == 2:
            total += times[0] - times[1]
            print(f"| {name} | {times[0]:.3f} | {times[1]:.4f} |")
    print(f"| first calls' excess, total | {total:.3f} | |")


if __name__ == "__main__":
    main()
