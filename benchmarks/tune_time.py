"""``quantkit tune``'s time and GPU memory at Llama-3.1-8B shapes, beside the shipped GPTQ row and
plain GPTQ on the same model (issue 20: the best 4-bit recipe within 2x GPTQ's time).

    python benchmarks/tune_time.py --layers 2,4 [--samples 128 --seq-len 2048 --steps 32 --batch 1]
    python benchmarks/tune_time.py --tiny        # the script checked on the CPU (not a measurement)

SmolLM2's seconds are overheads, so the time is measured where users pay it: random-weight models
of the 8B's layer shapes with a few decoder layers (``gpu_vs_llmcompressor.build_model``; random
weights make the KL meaningless, not the arithmetic), the calibration 128 x 2048 random ids. For
each layer count: the shipped ``llama8b-gptq`` quantization and plain GPTQ (act-order, static
groups, symmetric) by ``quantkit.quantize``, each end to end (load, calibrate, quantize, export),
then ``scale_tuning.tune_checkpoint`` on the shipped row's checkpoint with the given schedule
(read, load both models, tune, rewrite), after one untimed pass of all three on the smallest model.
Two layer counts give each cost's per-layer slope, and so
the full 32-layer model's seconds. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_vs_llmcompressor as bench  # noqa: E402

GIB = 1024**3
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            vocab_size=1024)


def measure(layers: int, work: Path, samples: int, seq_len: int, steps: int, batch: int, lr: float) -> dict:
    """Seconds of the shipped row, plain GPTQ and tune on a model of ``layers`` 8B-shaped layers."""
    import quantkit
    from safetensors.torch import load_file

    from quantkit.scale_tuning import tune_checkpoint
    from quantkit.tune_settings import TuneSettings

    model = bench.build_model("8b", layers, work / f"llama-8b-{layers}")
    vocab = bench.SHAPES["8b"]["config"].get("vocab_size", bench.CALIBRATION_VOCAB)
    calib = bench.build_calibration(work / f"calib-{samples}x{seq_len}-{vocab}.safetensors", samples, seq_len,
                                    vocab=vocab)
    out: dict = {"layers": layers}
    for method in ("shipped-gptq", "gptq"):
        folder = work / f"out-{method}-{layers}"
        began = time.perf_counter()
        quantkit.quantize(**bench._quantkit_recipe(method, model, calib, folder, samples, seq_len, 8), quiet=True)
        out[method] = time.perf_counter() - began
    if bench.DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    windows = list(load_file(str(calib))["input_ids"])
    report = tune_checkpoint(work / f"out-shipped-gptq-{layers}", model, windows, TuneSettings(steps, lr, batch),
                             torch.device(bench.DEVICE), quiet=True)
    out["tune"] = report["seconds"]
    out["tune_gib"] = torch.cuda.max_memory_allocated() / GIB if bench.DEVICE == "cuda" else 0.0
    return out


def at(rows: list[dict], key: str, layers: int) -> float:
    """``key``'s seconds at ``layers`` layers, on the line through the first and last measured counts."""
    a, b = rows[0], rows[-1]
    slope = (b[key] - a[key]) / (b["layers"] - a["layers"])
    return a[key] + slope * (layers - a["layers"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4", help="two or more decoder-layer counts, comma-separated")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="windows a tune step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-tune-time"))
    ap.add_argument("--tiny", action="store_true", help="the script checked on the CPU at tiny shapes")
    args = ap.parse_args(argv)
    if args.tiny:
        bench.DEVICE = "cpu"
        bench.SHAPES["8b"]["config"].update(TINY)
        args.work = args.work.with_name(args.work.name + "-tiny")
    args.work.mkdir(parents=True, exist_ok=True)
    counts = sorted(int(n) for n in args.layers.split(","))
    if len(counts) < 2:
        ap.error("--layers: give two counts at least, for the per-layer slope")
    # Imports, CUDA's start and the kernels' first launches, untimed: the first count pays none of them.
    measure(counts[0], args.work, args.samples, args.seq_len, 1, args.batch, args.lr)
    rows = [measure(n, args.work, args.samples, args.seq_len, args.steps, args.batch, args.lr) for n in counts]
    full = bench.SHAPES["8b"]["full_layers"]
    print(f"Llama-3.1-8B shapes on {bench.DEVICE}, calibration {args.samples} x {args.seq_len}; tune {args.steps} "
          f"steps of {args.batch} window(s), lr {args.lr:g}; seconds end to end")
    print("| layers | plain GPTQ | shipped row | tune | tune peak GiB | row / GPTQ | (row + tune) / GPTQ |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['gptq']:.1f} | {r['shipped-gptq']:.1f} | {r['tune']:.1f} | {r['tune_gib']:.1f} | "
              f"{r['shipped-gptq'] / r['gptq']:.2f} | {(r['shipped-gptq'] + r['tune']) / r['gptq']:.2f} |")
    g, s, t = (at(rows, k, full) for k in ("gptq", "shipped-gptq", "tune"))
    print(f"| {full} (from the slope) | {g:.1f} | {s:.1f} | {t:.1f} | – | {s / g:.2f} | {(s + t) / g:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
