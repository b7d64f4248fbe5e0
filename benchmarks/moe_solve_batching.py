"""GPTQ solves of one MoE layer: every expert's solve one call at a time against the batched
solves (``gptq_quantize_batch``), on the same Hessians.

    python benchmarks/moe_solve_batching.py                          # Qwen3-30B-A3B layer on the GPU
    python benchmarks/moe_solve_batching.py --shape mixtral-8x7b
    python benchmarks/moe_solve_batching.py --shape cpu-wide         # 32 experts at hidden 512, CPU

Builds (once, under ``--work``) a one-layer random-weight model of the shape with
``benchmarks/gpu_vs_llmcompressor.py``'s builder, calibrates layer 0 with every expert on every
token (random ids), then runs ``gptq_layer`` on its Hessians twice per scheme: with the experts'
solves batched (what a run does) and with one solve per call (what it did before), best of
three after a warm-up (CUDA graph capture). Prints one table: seconds per layer of each, the
speedup, and how many codes agree (bitwise on CPU; on CUDA the batched kernels may round a
product differently and flip a code on a rounding boundary). On CUDA times are wall time; on
the CPU they are the process's CPU seconds on one thread (a shared machine's load moves wall
time more than the work does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # quantkit from this checkout

import gpu_vs_llmcompressor as bench  # noqa: E402

from quantkit.engine import _LayerCalibration, make_batches  # noqa: E402
from quantkit.graph.runtime import ModelRunner  # noqa: E402
from quantkit.model import ModelSource  # noqa: E402
from quantkit.presets import PRESETS  # noqa: E402
from quantkit.quantizers import gptq  # noqa: E402

SCHEMES = {"W4A16 g128, act-order (static groups)": (PRESETS["W4A16"], dict(act_order=True, static_groups=True)),
           "NVFP4A16": (PRESETS["NVFP4A16"], {})}


def _timer(device: torch.device):
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.process_time


def _agreement(a: dict, b: dict) -> float:
    same = sum(int((a[n].codes.view(torch.uint8) == b[n].codes.view(torch.uint8)).sum()) for n in a)
    return same / sum(a[n].codes.numel() for n in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=[*bench.MOE_SHAPES, "cpu-wide"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", default="/tmp/quantkit-moe-solve")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    shape = args.shape
    if shape == "cpu-wide":
        shape = "qwen3-30b-a3b"
        bench.MOE_SHAPES[shape]["config"].update(bench._CPU_WIDE)
    folder = bench.build_moe_model(shape, 1, Path(args.work) / f"model-{args.shape}-1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runner = ModelRunner(ModelSource.open(str(folder)), device, dtype)
    vocab = bench.MOE_SHAPES[shape]["config"].get("vocab_size", bench.CALIBRATION_VOCAB)
    ids = torch.randint(3, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    batches = runner.capture(make_batches(list(ids), 8))
    layer = runner.load_layer(0)
    graph = runner.graph.layer(0)
    accs, hooks = gptq.collect_hessians(graph)
    _LayerCalibration(runner, 0, layer, batches, 0).run(hooks)
    now = _timer(device)
    budget = gptq._batch_budget
    rows = []
    for label, (scheme, opts) in SCHEMES.items():
        seconds, results = {}, {}
        for mode in ("one solve per call", "batched"):
            gptq._batch_budget = budget if mode == "batched" else (lambda _device: 0)
            results[mode] = gptq.gptq_layer(layer, graph, accs, scheme, **opts)  # warm-up: CUDA graphs
            times = []
            for _ in range(3):
                t = now()
                gptq.gptq_layer(layer, graph, accs, scheme, **opts)
                times.append(now() - t)
            seconds[mode] = min(times)
        gptq._batch_budget = budget
        one, batched = seconds["one solve per call"], seconds["batched"]
        rows.append(f"| {label} | {one:.2f} | {batched:.2f} | {one / batched:.1f}x | "
                    f"{100 * _agreement(results['one solve per call'], results['batched']):.2f}% |")
    unit = "wall s" if device.type == "cuda" else "CPU s, 1 thread"
    print(f"GPTQ solves of one {args.shape} MoE layer ({len(graph.linears)} Linears) on {device.type}, "
          f"{args.samples} x {args.seq_len} calibration tokens")
    print(f"| scheme | one solve per call ({unit}) | batched ({unit}) | speedup | codes equal |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
