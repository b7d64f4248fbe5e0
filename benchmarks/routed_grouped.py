"""The routed forward of one MoE experts block: the per-expert loop against grouped products.

    python benchmarks/routed_grouped.py                    # Qwen3-30B-A3B and DeepSeek-V3 blocks, GPU
    python benchmarks/routed_grouped.py --shape cpu-wide   # 128 experts at hidden 256, 4096 tokens, CPU

One ``UnfusedExperts`` block of the shape (the family's transformers experts class, unfused as
a run does it) with random weights (bf16 on CUDA, float32 on CPU), ``--tokens`` random hidden
states routed top-k by a random router (softmax, top-k, renormalised), then its routed forward
with each expert's Linears called one by one (what ``propagate`` did before) and with the
grouped products, best of ``--repeat`` after a warm-up. Prints one table: seconds per call of
each, the speedup, ATen operator calls per call of each (on a GPU most are a kernel launch),
host syncs per call of each (CUDA: counted by torch's sync debug mode), and how far the two
outputs are apart (max |difference| / max |output|; 0 on CPU for experts without biases). On
CUDA times are wall time after a synchronize; on the CPU they are the process's CPU seconds on
one thread (a shared machine's load moves wall time more than the work does).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # quantkit from this checkout

from quantkit.graph.experts import UnfusedExperts  # noqa: E402

# (transformers experts class module, class, config class, config): the experts' part of each shape.
SHAPES = {
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeConfig",
                      dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)),
    "deepseek-v3": ("deepseek_v3", "DeepseekV3Experts", "DeepseekV3Config",
                    dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8)),
    "cpu-wide": ("qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeConfig",
                 dict(hidden_size=256, moe_intermediate_size=64, num_experts=128, num_experts_per_tok=8)),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[UnfusedExperts, int]:
    import importlib

    import transformers

    family, cls_name, config_name, fields = SHAPES[shape]
    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls_name)
    config = getattr(transformers, config_name)(**fields)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        fused = cls(config)
    experts = UnfusedExperts(fused).to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02, generator=g)
    return experts, fields["num_experts_per_tok"]


def routed_inputs(experts: UnfusedExperts, top_k: int, tokens: int, seed: int = 1):
    device, dtype = experts[0].up_proj.weight.device, experts[0].up_proj.weight.dtype
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, experts.layout.hidden, device=device, generator=g).to(dtype)
    router = torch.randn(experts.layout.num_experts, experts.layout.hidden, device=device, generator=g).to(dtype)
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, idx = torch.topk(probs, top_k, dim=-1)
    return x, idx, (weights / weights.sum(-1, keepdim=True)).to(dtype)


def timed(fn, device: torch.device, repeat: int) -> tuple[float, torch.Tensor]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.perf_counter if device.type == "cuda" else time.process_time
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = clock()
        out = fn()
        sync()
        best = min(best, clock() - t0)
    return best, out


def host_syncs(fn, device: torch.device) -> int | None:
    """Syncs one call makes, as torch's CUDA sync debug mode reports them (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def aten_ops(fn) -> int:
    """ATen operator calls one call makes (views included): on a GPU most launch a kernel, and
    a launch-bound forward's time follows their number."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def measure(shape: str, device: torch.device, dtype: torch.dtype, tokens: int, repeat: int) -> tuple:
    """One table row: the block of ``shape`` on ``tokens`` routed tokens, per expert and grouped."""
    experts, top_k = build(shape, device, dtype)
    x, idx, w = routed_inputs(experts, top_k, tokens)

    def call() -> torch.Tensor:
        return experts(x, idx, w)

    with torch.no_grad():
        assert experts._grouped(x), f"{shape}: the grouped path does not take {dtype} on {device}"
        grouped_s, got = timed(call, device, repeat)
        syncs, grouped_ops = host_syncs(call, device), aten_ops(call)
        original = UnfusedExperts._grouped
        UnfusedExperts._grouped = lambda self, x: False
        try:
            loop_s, want = timed(call, device, repeat)
            loop_syncs, loop_ops = host_syncs(call, device), aten_ops(call)
        finally:
            UnfusedExperts._grouped = original
    apart = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    return (shape, experts.layout.num_experts, experts.layout.hidden, experts.layout.intermediate, top_k, tokens,
            loop_s, grouped_s, f"{loop_ops} / {grouped_ops}", "-" if syncs is None else f"{loop_syncs} / {syncs}",
            apart)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--shape", action="append", choices=list(SHAPES),
                    help="repeatable; default qwen3-30b-a3b and deepseek-v3 on CUDA, cpu-wide on CPU")
    ap.add_argument("--tokens", type=int, default=None, help="default 2048 x 8 on CUDA, 4096 on CPU")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = args.shape or (["qwen3-30b-a3b", "deepseek-v3"] if cuda else ["cpu-wide"])
    tokens = args.tokens or (2048 * 8 if cuda else 4096)
    if not cuda:
        torch.set_num_threads(1)
    rows = []
    for shape in shapes:
        rows.append(measure(shape, device, dtype, tokens, args.repeat))
        if cuda:
            torch.cuda.empty_cache()

    print(f"routed forward of one experts block, {dtype} on {torch.cuda.get_device_name() if cuda else 'CPU, 1 thread'}"
          f", torch {torch.__version__}")
    head = ("shape", "experts", "hidden", "inter", "top-k", "tokens", "per-expert s", "grouped s", "speedup",
            "aten ops/call (per-expert / grouped)", "host syncs/call (per-expert / grouped)", "max|diff|/max|out|")
    print(" | ".join(head))
    for shape, e, h, i, k, t, loop_s, grouped_s, ops, syncs, apart in rows:
        print(" | ".join([shape, str(e), str(h), str(i), str(k), str(t), f"{loop_s:.4f}", f"{grouped_s:.4f}",
                          f"{loop_s / grouped_s:.2f}x", ops, syncs, f"{apart:.2e}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
