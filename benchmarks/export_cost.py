"""The fixed per-run costs around the engine on the CPU: the export stage (work folder -> shards)
and the once-per-run validation, on a tiny-but-wide MoE and a dense model.

    python benchmarks/export_cost.py                                  # both cases, this checkout
    python benchmarks/export_cost.py --quantkit /tmp/qk-base          # another checkout's quantkit/
    python benchmarks/export_cost.py --ops                            # also count ops and host syncs
    python benchmarks/export_cost.py --cases full-qwen3-30b,full-gemma3-12b   # validation of full models

Cases (random weights, built once under ``--work`` with ``gpu_vs_llmcompressor.py``'s builders):
``moe``: Qwen3-MoE, 2 layers, 128 experts of 256 x 1024 (hidden 1024): 776 quantized Linears,
the per-expert costs of Qwen3-30B-A3B (128 experts) at a size a CPU runs; ``dense``: Llama, 4
layers, hidden 1024, intermediate 4096. Each is quantized with RTN W4A16 g128 into
compressed-tensors (so the engine is cheap and the fixed costs show), ``--repeat`` times; the
table gives, per stage, the best run's CPU seconds on one thread (a shared machine's load
moves wall time more than the work does; the export's in its own thread, beside the engine)
and its wall seconds, for the whole export and for what is left after the last layer;
validation also the first run's (which alone derives the layer graphs by tracing tiny layers:
once per layer type and process). ``--ops`` counts, in one more run, the torch operations the
export dispatches (packing, checks, writing) and how many of them wait for a result on the
host (``.item()``/``bool()``: on a GPU each is a device sync) -- device-independent measures
of what a GPU export pays per Linear.

``full-qwen3-30b``, ``full-gemma3-12b`` and ``full-deepseek-v3``: ``preflight.check`` (a run's
validation, whose model skeleton, layer graph and names the run then takes over) alone, on the
released models' configs at full depth (48 layers each, 61 for DeepSeek-V3; 6,144 experts for
Qwen3-30B-A3B, 15,616 for DeepSeek-V3)
from their transformers config classes, with one header-only shard whose data is a hole in a
sparse file (no weight exists; the disk check is told there is room).
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
FULL = {"full-qwen3-30b": "qwen3-30b-a3b", "full-gemma3-12b": "gemma3-12b", "full-deepseek-v3": "deepseek-v3"}
HOST_SYNC = "aten::_local_scalar_dense"
"""What ``.item()`` and ``bool()`` of a tensor dispatch to."""


def build(case: str, work: Path) -> Path:
    import gpu_vs_llmcompressor as bench

    if case == "moe":
        bench.MOE_SHAPES["qwen3-30b-a3b"]["config"].update(MOE)
        return bench.build_moe_model("qwen3-30b-a3b", 2, work / "model-moe")
    bench.SHAPES["8b"]["config"].update(DENSE)
    return bench.build_model("8b", 4, work / "model-dense")


def build_header_only(case: str, work: Path) -> Path:
    """A model folder whose one shard has the full model's header and a hole for its data."""
    import json
    import struct

    import torch
    import transformers

    import gpu_vs_llmcompressor as bench
    from quantkit.graph.skeleton import build_meta

    folder = work / f"model-{case}"
    if (folder / "config.json").is_file():
        return folder
    shape = FULL[case]
    if shape in bench.MOE_SHAPES:
        s = bench.MOE_SHAPES[shape]
        config = transformers.CONFIG_MAPPING[s["model_type"]](**s["config"], num_hidden_layers=s["full_layers"])
    else:
        layers = bench.SHAPES[shape]["full_layers"]
        spec = bench.SHAPES[shape]["config"]
        if "layer_types" in spec:  # the released pattern: five sliding-window layers, then a global one
            spec["layer_types"] = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
        config = bench.model_config(shape, layers)
    cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    config.architectures = [cls.__name__]
    config.dtype = "bfloat16"
    folder.mkdir(parents=True)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, p in build_meta(cls, config, torch.bfloat16).state_dict().items():
        header[name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + 2 * p.numel()]}
        offset += 2 * p.numel()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    config.save_pretrained(folder)
    return folder


def validate_once(model: Path, calib: Path, out: Path) -> dict:
    import collections

    from quantkit import preflight
    from quantkit.recipe import make_recipe

    recipe = make_recipe({"model": {"id": str(model), "dtype": "bfloat16"},
                          "quantization": {"method": "gptq", "bits": 4, "group_size": 128},
                          "calibration": {"source": str(calib), "num_samples": 4, "max_seq_length": 64},
                          "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"})
    usage, room = preflight.shutil.disk_usage, collections.namedtuple("usage", "total used free")(1 << 50, 0, 1 << 50)
    preflight.shutil.disk_usage = lambda path: room
    try:
        c, w = time.process_time(), time.perf_counter()
        preflight.check(recipe)
        return {"seconds": {"validation": (time.process_time() - c, time.perf_counter() - w)}}
    finally:
        preflight.shutil.disk_usage = usage


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
    from torch.utils._python_dispatch import _disable_current_modes

    import quantkit
    from quantkit import export, pipeline, preflight, workdir

    seconds: dict[str, tuple[float, float]] = {}
    counter = _OpCounter() if count_ops else None

    def timed(owner, attr: str, stages: tuple[str, ...], count: bool = False) -> None:
        """Each call's CPU seconds (its own thread's: the export runs in a thread of its own) and
        wall seconds, added to ``stages``."""
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            c, w = time.thread_time(), time.perf_counter()
            try:
                if count and counter is not None:
                    with counter.mode:
                        return fn(*a, **k)
                return fn(*a, **k)
            finally:
                for stage in stages:
                    was = seconds.get(stage, (0.0, 0.0))
                    seconds[stage] = (was[0] + time.thread_time() - c, was[1] + time.perf_counter() - w)

        setattr(owner, attr, wrapper)

    # The export: all of it, and what is left after the last layer (the rest runs beside the engine).
    if hasattr(pipeline, "export_checkpoint"):  # before streaming: all of it after the last layer
        patched = [(pipeline, "export_checkpoint", ("export", "after the last layer"), True)]
    else:
        patched = [(export, "copy_untouched_sources", ("export",), False), (export, "export_layer", ("export",), True),
                   (export.StreamingExport, "finish", ("export", "after the last layer"), True)]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _, _ in patched]
    originals += [(preflight, "check_run", preflight.check_run), (workdir.WorkDir, "load_layer", workdir.WorkDir.load_layer)]
    for owner, attr, stages, count in patched:
        timed(owner, attr, stages, count=count)
    timed(preflight, "check_run", ("validation",))
    load = workdir.WorkDir.load_layer

    def load_uncounted(self, i):  # reading the work folder is host work (safetensors' storage indexing)
        with _disable_current_modes():
            return load(self, i)

    workdir.WorkDir.load_layer = load_uncounted
    try:
        c, w = time.process_time(), time.perf_counter()
        quantkit.quantize(model={"id": str(model), "dtype": "bfloat16"},
                          quantization={"method": "rtn", "bits": 4, "group_size": 128},
                          calibration={"source": str(calib), "num_samples": 4, "max_seq_length": 64, "batch_size": 4},
                          evaluate={"enabled": False}, export={"output_dir": str(out), "overwrite": True},
                          device="cpu", quiet=True)
        seconds["run"] = (time.process_time() - c, time.perf_counter() - w)
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
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
        if case in FULL:
            model = build_header_only(case, work)
            runs = [validate_once(model, calib, work / f"out-{case}") for _ in range(args.repeat)]
        else:
            model = build(case, work)
            runs = [run_once(model, calib, work / f"out-{case}", False) for _ in range(args.repeat)]
        best = {stage: min(r["seconds"][stage] for r in runs) for stage in runs[0]["seconds"]}
        best["first validation"] = runs[0]["seconds"]["validation"]
        ops = run_once(model, calib, work / f"out-{case}", True) if args.ops and case not in FULL else {}
        rows.append((case, best, ops))
    print(f"quantkit from {Path(quantkit.__file__).parent}; RTN W4A16 g128, compressed-tensors, CPU, 1 thread; "
          f"best of {args.repeat} (CPU s / wall s)")
    print("| case | export | export after the last layer | validation: first / best | whole run | export ops | "
          "export host syncs |")
    print("|---|---|---|---|---|---|---|")
    for case, best, ops in rows:
        cell = {"export": "-", "after the last layer": "-", "run": "-",
                **{k: f"{v[0]:.2f} / {v[1]:.2f}" for k, v in best.items()}}
        print(f"| {case} | {cell['export']} | {cell['after the last layer']} | {cell['first validation']}; "
              f"{cell['validation']} | {cell['run']} | {ops.get('ops', '-')} | {ops.get('host_syncs', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
