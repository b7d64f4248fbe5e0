"""The fixed per-run costs around the engine on the CPU: the export stage (work folder -> shards)
and the once-per-run validation, on a tiny-but-wide MoE and a dense model.

    python benchmarks/export_cost.py                                  # both cases, this checkout
    python benchmarks/export_cost.py --quantkit /tmp/qk-base          # another checkout's quantkit/
    python benchmarks/export_cost.py --ops                            # also count ops and host syncs

Cases (random weights, built once under ``--work`` with ``gpu_vs_llmcompressor.py``'s builders):
``moe``: Qwen3-MoE, 2 layers, 128 experts of 256 x 1024 (hidden 1024): 776 quantized Linears,
the per-expert costs of Qwen3-30B-A3B (128 experts) at a size a CPU runs; ``dense``: Llama, 4
layers, hidden 1024, intermediate 4096. Each is quantized with RTN W4A16 g128 into
compressed-tensors (so the engine is cheap and the fixed costs show), ``--repeat`` times; the
table gives, per stage, the best run's process CPU seconds on one thread (a shared machine's
load moves wall time more than the work does) and its wall seconds. ``--ops`` counts, in one
more run, the torch operations the export dispatches and how many of them wait for a result on
the host (``.item()``/``bool()``: on a GPU each is a device sync) -- device-independent
measures of what a GPU export pays per Linear.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

MOE = dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_experts=128,
           num_experts_per_tok=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=1024)
DENSE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             vocab_size=1024)
HOST_SYNC = "aten::_local_scalar_dense"
"""What ``.item()`` and ``bool()`` of a tensor dispatch to."""


def build(case: str, work: Path) -> Path:
    import gpu_vs_llmcompressor as bench

    if case == "moe":
        bench.MOE_SHAPES["qwen3-30b-a3b"]["config"].update(MOE)
        return bench.build_moe_model("qwen3-30b-a3b", 2, work / "model-moe")
    bench.SHAPES["8b"]["config"].update(DENSE)
    return bench.build_model("8b", 4, work / "model-dense")


class _OpCounter:
    """Counts the aten ops dispatched while it is on, and the ones that return a value to the host."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func._schema.name] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def run_once(model: Path, calib: Path, out: Path, count_ops: bool) -> dict:
    import quantkit
    from quantkit import pipeline, preflight

    seconds: dict[str, tuple[float, float]] = {}
    counter = _OpCounter() if count_ops else None

    def timed(owner, attr: str, stage: str, count: bool = False) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            c, w = time.process_time(), time.perf_counter()
            try:
                if count and counter is not None:
                    with counter.mode:
                        return fn(*a, **k)
                return fn(*a, **k)
            finally:
                seconds[stage] = (time.process_time() - c, time.perf_counter() - w)

        setattr(owner, attr, wrapper)

    originals = (pipeline.export_checkpoint, preflight.check)
    timed(pipeline, "export_checkpoint", "export", count=True)
    timed(preflight, "check", "validation")
    try:
        c, w = time.process_time(), time.perf_counter()
        quantkit.quantize(model={"id": str(model), "dtype": "bfloat16"},
                          quantization={"method": "rtn", "bits": 4, "group_size": 128},
                          calibration={"source": str(calib), "num_samples": 4, "max_seq_length": 64, "batch_size": 4},
                          evaluate={"enabled": False}, export={"output_dir": str(out), "overwrite": True},
                          device="cpu", quiet=True)
        seconds["run"] = (time.process_time() - c, time.perf_counter() - w)
    finally:
        pipeline.export_checkpoint, preflight.check = originals
    result = {"seconds": seconds}
    if counter is not None:
        result["ops"] = sum(counter.counts.values())
        result["host_syncs"] = counter.counts[HOST_SYNC]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="moe,dense")
    ap.add_argument("--work", default="/tmp/quantkit-export-cost")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ops", action="store_true", help="one more run counting the export's torch ops and host syncs")
    ap.add_argument("--quantkit", help="a folder holding another checkout's quantkit/ package (before/after)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, args.quantkit or str(HERE.parent))
    import torch

    import gpu_vs_llmcompressor as bench
    import quantkit

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = bench.build_calibration(work / "calib.safetensors", 4, 64, vocab=1024)
    rows = []
    for case in args.cases.split(","):
        model = build(case, work)
        runs = [run_once(model, calib, work / f"out-{case}", False) for _ in range(args.repeat)]
        best = {stage: min(r["seconds"][stage] for r in runs) for stage in runs[0]["seconds"]}
        ops = run_once(model, calib, work / f"out-{case}", True) if args.ops else {}
        rows.append((case, best, ops))
    print(f"quantkit from {Path(quantkit.__file__).parent}; RTN W4A16 g128, compressed-tensors, CPU, 1 thread; "
          f"best of {args.repeat} (process CPU s / wall s)")
    print("| case | export | validation | whole run | export ops | export host syncs |")
    print("|---|---|---|---|---|---|")
    for case, best, ops in rows:
        cell = {k: f"{v[0]:.2f} / {v[1]:.2f}" for k, v in best.items()}
        print(f"| {case} | {cell['export']} | {cell['validation']} | {cell['run']} | {ops.get('ops', '-')} | "
              f"{ops.get('host_syncs', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
