"""``quantkit tune``'s time and GPU memory at Llama-3.1-8B shapes, beside the shipped GPTQ row and
plain GPTQ on the same model (issue 20: the best 4-bit recipe within 2x GPTQ's time).

    python benchmarks/tune_time.py --layers 2,32 [--samples 128 --seq-len 2048 --steps 32 --batch 1] \
        [--variants bfloat16:bf16,bfloat16:tf32,float32:tf32,float32:float32,bfloat16:bf16:16]
    python benchmarks/tune_time.py --layers 2,32 --row-set input_feedback=true --row-set sequential=true
    python benchmarks/tune_time.py --tiny        # the script checked on the CPU (not a measurement)

SmolLM2's seconds are overheads, so the time is measured where users pay it: random-weight models
of the 8B's layer shapes with a few decoder layers (``gpu_vs_llmcompressor.build_model``; random
weights make the KL meaningless, not the arithmetic), the calibration 128 x 2048 random ids. For
each layer count: the shipped ``llama8b-gptq`` quantization and plain GPTQ (act-order, static
groups, symmetric) by ``quantkit.quantize``, each end to end (load, calibrate, quantize, export),
then ``scale_tuning.tune_checkpoint`` on the shipped row's checkpoint with the given schedule
(read, load both models, tune, rewrite), after one untimed pass of all three on the smallest model.
Two layer counts give each cost's per-layer slope, and so
the full 32-layer model's seconds; give 32 itself (about 230 s on an H200): tune's memory at 2
and 4 layers extrapolated to 61 GiB where the 32 layers hold 84, and its seconds to 31-53 in
three calls of the same code (stop 44). Tune's peak GPU memory is its own, above what was
held before it started. Prints one table, then tune's seconds by stage (loading the student and
the teacher, the KL before and after, the steps, the rewrite and, of it, the wait for the
shards' background copies) and its peak memory by stage. ``--memory-cap-gib 79.1`` holds the
process to an H100 80GB's memory: does tune fit there?

``--row-set FIELD=VALUE`` changes a field of the shipped row's ``quantization`` (the value read as
YAML) for the row quantized and tuned here: what does another row cost, tuned? (``llama8b-gptq``
has left out ``input_feedback`` and ``sequential`` since stop 45; the example puts them back.)

Each ``--variants`` entry tunes its own copy of the row's checkpoint: ``bfloat16:bf16`` is what tune
does on a GPU; ``float32:…`` holds the base in float32, ``…:tf32`` runs the quantized Linears'
products in float32 (TF32) as stop 43 did, ``…:float32`` the steps and the KL without tensor
cores (``scale_tuning.products_dtype``, ``scale_tuning.tensor_core_matmuls``); a third field
overrides ``--steps`` for that entry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_vs_llmcompressor as bench  # noqa: E402

GIB = 1024**3
stages: dict[str, float] = {}  # tune's seconds by stage in the current measurement
peaks: dict[str, int] = {}  # its peak GPU bytes by stage ("before": outside the stages, up to the last one)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            vocab_size=1024)


STAGES = ("read_packed", "load_student", "load_teacher", "mean_kl", "tune", "rewrite_shards")


def timed_stages(seconds: dict[str, float]) -> None:
    """Wrap ``scale_tuning``'s stages with synchronised timers that add into ``seconds``."""
    from quantkit import scale_tuning

    def wrap(stage: str):
        inner = getattr(scale_tuning, stage)

        def call(*args, **kwargs):
            cuda = bench.DEVICE == "cuda"
            if cuda:
                torch.cuda.synchronize()
                peaks["before"] = max(peaks.get("before", 0), torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                    peaks[stage] = max(peaks.get(stage, 0), torch.cuda.max_memory_allocated())
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - began
        return call

    for stage in STAGES:
        setattr(scale_tuning, stage, wrap(stage))
    wait = scale_tuning.ShardCopies.wait

    def waited(self):  # the part of the rewrite spent waiting for the background copies
        began = time.perf_counter()
        try:
            return wait(self)
        finally:
            seconds["copies_wait"] = seconds.get("copies_wait", 0.0) + time.perf_counter() - began
    scale_tuning.ShardCopies.wait = waited


@contextlib.contextmanager
def variant(teacher_dtype: str, matmul: str) -> Iterator[None]:
    """``scale_tuning`` holding the base in ``teacher_dtype`` and running the steps' products as
    ``matmul``: ``bf16`` the quantized Linears' in bf16 and the other float32 ones as TF32
    (``bfloat16:bf16`` is what it does on a GPU with a bf16 base), ``tf32`` all float32 as TF32
    (stop 43), ``float32`` none on tensor cores (stop 42)."""
    from quantkit import scale_tuning

    load, matmuls, products = scale_tuning.load_teacher, scale_tuning.tensor_core_matmuls, scale_tuning.products_dtype
    scale_tuning.load_teacher = lambda base_dir, device, dtype: load(base_dir, device, getattr(torch, teacher_dtype))
    if matmul != "bf16":
        scale_tuning.products_dtype = lambda device: torch.float32
    if matmul == "float32":
        scale_tuning.tensor_core_matmuls = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        scale_tuning.load_teacher, scale_tuning.tensor_core_matmuls = load, matmuls
        scale_tuning.products_dtype = products


def measure(layers: int, work: Path, samples: int, seq_len: int, settings, variants: list[str],
            row_set: dict) -> list[dict]:
    """Seconds of the shipped row (its fields changed by ``row_set``) and plain GPTQ on a model of
    ``layers`` 8B-shaped layers, then of tune on a fresh copy of the row's checkpoint for each
    ``teacher:matmul[:steps]`` variant (its steps, except in the untimed one-step warm-up)."""
    import quantkit
    from safetensors.torch import load_file

    from quantkit.scale_tuning import tune_checkpoint

    model = bench.build_model("8b", layers, work / f"llama-8b-{layers}")
    vocab = bench.SHAPES["8b"]["config"].get("vocab_size", bench.CALIBRATION_VOCAB)
    calib = bench.build_calibration(work / f"calib-{samples}x{seq_len}-{vocab}.safetensors", samples, seq_len,
                                    vocab=vocab)
    quantized: dict = {"layers": layers}
    for method in ("shipped-gptq", "gptq"):
        folder = work / f"out-{method}-{layers}"
        recipe = bench._quantkit_recipe(method, model, calib, folder, samples, seq_len, 8)
        if method == "shipped-gptq":
            recipe["quantization"].update(row_set)
        began = time.perf_counter()
        quantkit.quantize(**recipe, quiet=True)
        quantized[method] = time.perf_counter() - began
    windows = list(load_file(str(calib))["input_ids"])
    rows = []
    for name in variants:
        folder = work / f"tune-{layers}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(work / f"out-shipped-gptq-{layers}", folder)
        gc.collect()
        held = 0
        if bench.DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        stages.clear()
        peaks.clear()
        teacher, matmul, *steps = name.split(":")
        mine = dataclasses.replace(settings, steps=int(steps[0])) if steps and settings.steps > 1 else settings
        with variant(teacher, matmul):
            report = tune_checkpoint(folder, model, windows, mine, torch.device(bench.DEVICE), quiet=True)
        rows.append({**quantized, "variant": name, "tune": report["seconds"], "stages": dict(stages),
                     "kl_windows": report["kl_windows"], "kl": (report["kl_before"], report["kl_after"]),
                     "tune_gib": (max(peaks.values(), default=0) - held) / GIB if bench.DEVICE == "cuda" else 0.0,
                     "peaks": {k: (v - held) / GIB for k, v in peaks.items()},
                     "held_gib": held / GIB})
    return rows


def at(rows: list[dict], key: str, layers: int) -> float:
    """``key``'s seconds at ``layers`` layers, on the line through the first and last measured counts."""
    a, b = rows[0], rows[-1]
    slope = (b[key] - a[key]) / (b["layers"] - a["layers"])
    return a[key] + slope * (layers - a["layers"])


def main(argv: list[str] | None = None) -> int:
    from quantkit.tune_settings import TuneSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4", help="two or more decoder-layer counts, comma-separated")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="windows a tune step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="bfloat16:bf16",
                    help="comma-separated TEACHER:MATMUL[:STEPS], TEACHER float32 or bfloat16, MATMUL bf16, tf32 or "
                         "float32, STEPS overriding --steps")
    ap.add_argument("--row-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the shipped row's quantization changed for the row quantized and tuned")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="hold the process to this much GPU memory, as a smaller card would (an H100 80GB: 79.1)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-tune-time"))
    ap.add_argument("--tiny", action="store_true", help="the script checked on the CPU at tiny shapes")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    for name in variants:
        teacher, matmul, *steps = name.split(":")
        if (teacher not in ("float32", "bfloat16") or matmul not in ("bf16", "tf32", "float32") or len(steps) > 1
                or not all(n.isdigit() for n in steps)):
            ap.error(f"--variants: {name!r} is not TEACHER:MATMUL[:STEPS]")
    row_set = {}
    for item in args.row_set:
        field, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--row-set: {item!r} is not FIELD=VALUE")
        row_set[field] = yaml.safe_load(value)
    if args.tiny:
        bench.DEVICE = "cpu"
        bench.SHAPES["8b"]["config"].update(TINY)
        args.work = args.work.with_name(args.work.name + "-tiny")
    args.work.mkdir(parents=True, exist_ok=True)
    timed_stages(stages)
    if args.memory_cap_gib and bench.DEVICE == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            args.memory_cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    counts = sorted(int(n) for n in args.layers.split(","))
    if len(counts) < 2:
        ap.error("--layers: give two counts at least, for the per-layer slope")
    settings = TuneSettings(args.steps, args.lr, args.batch)
    # Imports, CUDA's start and the kernels' first launches, untimed: the first count pays none of them.
    measure(counts[0], args.work, args.samples, args.seq_len, TuneSettings(1, args.lr, args.batch), variants,
            row_set)
    rows = [r for n in counts for r in measure(n, args.work, args.samples, args.seq_len, settings, variants, row_set)]
    full = bench.SHAPES["8b"]["full_layers"]
    print(f"Llama-3.1-8B shapes on {bench.DEVICE}, calibration {args.samples} x {args.seq_len}; tune {args.steps} "
          f"steps of {args.batch} window(s), lr {args.lr:g}; seconds end to end; tune as teacher:matmuls")
    print(f"Row: the shipped llama8b-gptq quantization{', with ' + str(row_set) if row_set else ''}")
    if args.memory_cap_gib:
        print(f"The process held to {args.memory_cap_gib:g} GiB of GPU memory")
    print("| layers | tune as | plain GPTQ | row | tune | tune peak GiB | row / GPTQ | (row + tune) / GPTQ |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        for r in mine:
            print(f"| {r['layers']} | {name} | {r['gptq']:.1f} | {r['shipped-gptq']:.1f} | {r['tune']:.1f} | "
                  f"{r['tune_gib']:.1f} | {r['shipped-gptq'] / r['gptq']:.2f} | "
                  f"{(r['shipped-gptq'] + r['tune']) / r['gptq']:.2f} |")
        g, s, t, m = (at(mine, k, full) for k in ("gptq", "shipped-gptq", "tune", "tune_gib"))
        print(f"| {full} (from the slope) | {name} | {g:.1f} | {s:.1f} | {t:.1f} | {m:.1f} | {s / g:.2f} | "
              f"{(s + t) / g:.2f} |")
    print()
    timed = (*STAGES, "copies_wait")
    print("| layers | tune as | " + " | ".join(timed) + " | KL windows | KL before → after | GiB held before |")
    print("|---:|---|" + "---:|" * (len(timed) + 3))
    for r in rows:
        print(f"| {r['layers']} | {r['variant']} | " + " | ".join(f"{r['stages'].get(k, 0.0):.1f}" for k in timed)
              + f" | {r['kl_windows']} | {r['kl'][0]:.4f} → {r['kl'][1]:.4f} | {r['held_gib']:.1f} |")
    if bench.DEVICE == "cuda":
        print()
        print("Peak GiB above what was held before tune, by stage (before: outside the stages):")
        print("| layers | tune as | before | " + " | ".join(STAGES) + " |")
        print("|---:|---|---:|" + "---:|" * len(STAGES))
        for r in rows:
            print(f"| {r['layers']} | {r['variant']} | {r['peaks'].get('before', 0.0):.1f} | "
                  + " | ".join(f"{r['peaks'].get(k, 0.0):.1f}" for k in STAGES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
