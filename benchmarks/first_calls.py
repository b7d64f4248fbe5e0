"""What the first call of each GPU operation a GPTQ layer uses costs in a fresh process, against
its second call (the first layer of a run pays the difference).

    python benchmarks/first_calls.py

Shapes are Mixtral-8x7B's: a 14336-wide down_proj Hessian, 4096-wide hidden states, a bf16
expert matmul. Prints one table: first call, second call, their difference, in seconds.
"""

from __future__ import annotations

import time

import torch


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> int:
    dev = torch.device("cuda")
    torch.cuda.init()
    wide = 14336
    a = torch.randn(wide, 256, device=dev)
    h = a @ a.T + torch.eye(wide, device=dev)  # positive definite; its own first matmul is untimed
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16)
    f32 = torch.randn(8192, 4096, device=dev)
    steps = {
        "bf16 matmul (expert up_proj)": lambda: x @ w.T,
        "fp32 X^T X (Hessian add)": lambda: f32.T @ f32,
        "cholesky_ex 14336 fp32": lambda: torch.linalg.cholesky_ex(h),
        "solve_triangular 2048 fp32": lambda: torch.linalg.solve_triangular(
            torch.linalg.cholesky(h[:2048, :2048]), torch.eye(2048, device=dev), upper=False),
        "sdpa bf16 (32 heads, 2048 tokens)": lambda: torch.nn.functional.scaled_dot_product_attention(
            *(torch.randn(4, 32, 2048, 128, device=dev, dtype=torch.bfloat16) for _ in range(3)), is_causal=True),
        "allocate 40 GiB in 1 GiB blocks, free": lambda: [torch.empty(1 << 30, dtype=torch.uint8, device=dev)
                                                          for _ in range(40)],
    }
    try:
        from quantkit.quantizers import gptq_block_kernel

        if gptq_block_kernel.available(dev):
            wq = torch.randn(8, 4096, 128, device=dev)
            u = torch.linalg.cholesky(torch.eye(128, device=dev) * 2).T.contiguous().unsqueeze(0)
            s = torch.full_like(wq, 0.1)
            steps["GPTQ Triton block (8 x 4096 x 128)"] = lambda: gptq_block_kernel.quantize_block(
                wq, u, s, None, -8.0, 7.0)
    except ImportError:
        pass
    rows = []
    for name, fn in steps.items():
        first = _timed(fn)
        second = _timed(fn)
        rows.append((name, first, second))
    print("| operation | first call s | second call s | first − second s |")
    print("|---|---:|---:|---:|")
    for name, first, second in rows:
        print(f"| {name} | {first:.3f} | {second:.3f} | {first - second:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
