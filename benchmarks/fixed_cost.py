"""The fixed cost of a run before its first layer, on the CPU: validation, the model class and
layer graph, the shard check, the tokenizer, the finite check of embedding/head, fingerprinting
and calibration loading (issue 16 point 6 / issue 15 point 9).

    python benchmarks/fixed_cost.py                                   # every case, this checkout
    python benchmarks/fixed_cost.py --quantkit /tmp/qk-base           # another checkout's quantkit/ (before/after)
    python benchmarks/fixed_cost.py --cases qwen3-30b-2 --work /tmp/qk-fixed

Cases: ``qwen3-30b-2``: the GPU bench's moe-gptq-qwen3-30b-2 model (``gpu_vs_llmcompressor.
build_moe_model``: 2 decoder layers of Qwen3-30B-A3B's shape, 128 experts, random bf16 weights,
3.7 GB under ``--work``, built once), its GPTQ recipe's ``pipeline.run`` stopped where
``engine.run`` would start; ``full-qwen3-30b`` and ``full-deepseek-v3``: the released configs at
full depth (6,144 and 15,616 experts) with one header-only shard (``export_cost.
build_header_only``; no weight exists), validation and the run's ``ModelRunner``.

Each case runs in a process of its own, twice: the first call pays what a process pays once
(the layer graphs' derivation, transformers' conversion table), the second what every run does.
The worker imports what the GPU bench's quantkit worker imports before timing anything. The
table gives process CPU seconds on one torch thread (a shared machine's load moves wall time
more than the work), per stage, first call / second call.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("qwen3-30b-2", "full-qwen3-30b", "full-deepseek-v3")
STAGES = ("validation", "model class and graph", "shard check", "tokenizer", "finite check", "fingerprint",
          "calibration")


class _Stop(Exception):
    """Raised where the first layer would start."""


def worker(case: str, work: Path) -> list[dict[str, float]]:
    import torch

    import quantkit  # noqa: F401  (the bench worker's imports, not timed)
    import transformers.modeling_utils  # noqa: F401
    from quantkit import engine, pipeline, preflight
    from quantkit.graph import runtime
    from quantkit.model import ModelSource
    from quantkit.recipe import make_recipe

    import export_cost
    import gpu_vs_llmcompressor as bench

    torch.set_num_threads(1)
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(owner, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            c = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                seconds[stage] += time.process_time() - c

        setattr(owner, attr, wrapper)

    calib = bench.build_calibration(work / "calib.safetensors", 4, 64, vocab=1024)
    validate = "check_run" if hasattr(preflight, "check_run") else "check"  # before: no hand-over
    if case == "qwen3-30b-2":
        model = bench.build_moe_model("qwen3-30b-a3b", 2, work / "model-qwen3-30b-a3b-2")
    else:
        export_cost.FULL.setdefault("full-deepseek-v3", "deepseek-v3")
        model = export_cost.build_header_only(case, work)
        room = collections.namedtuple("usage", "total used free")(1 << 50, 0, 1 << 50)
        preflight.shutil.disk_usage = lambda path: room  # the header-only shard's data is a hole
    recipe = make_recipe({"model": {"id": str(model), "dtype": "bfloat16"},
                          "quantization": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True,
                                           "static_groups": True},
                          "calibration": {"source": str(calib), "num_samples": 4, "max_seq_length": 64,
                                          "batch_size": 4},
                          "evaluate": {"enabled": False},
                          "export": {"output_dir": str(work / f"out-{case}"), "overwrite": True}, "device": "cpu"})
    for owner, attr, stage in ((preflight, validate, "validation"), (runtime.ModelRunner, "__init__",
                               "model class and graph"), (pipeline, "check_model_files", "shard check"),
                               (pipeline, "load_tokenizer", "tokenizer"), (pipeline, "check_source_tensors",
                               "finite check"), (pipeline, "fingerprint_weights", "fingerprint"),
                               (pipeline, "load_tokens", "calibration")):
        timed(owner, attr, stage)

    def stop(*a, **k):
        raise _Stop

    engine.LayerwiseEngine.run = stop
    calls = []
    for _ in range(2):
        seconds.clear()
        c = time.process_time()
        if case == "qwen3-30b-2":
            try:
                pipeline.run(recipe, quiet=True)
            except _Stop:
                pass
        else:
            out = getattr(preflight, validate)(recipe)
            view = {"view": out[1]} if validate == "check_run" else {}
            runtime.ModelRunner(ModelSource.open(str(model)), torch.device("cpu"), torch.float32, **view)
        calls.append({"total": time.process_time() - c, **seconds})
    return calls


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        sys.path.insert(0, argv[3])
        sys.path.insert(1, str(HERE))
        print(json.dumps(worker(argv[1], Path(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--work", default="/tmp/quantkit-fixed-cost")
    ap.add_argument("--quantkit", help="a folder holding another checkout's quantkit/ package (before/after)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = str(Path(args.quantkit).resolve()) if args.quantkit else str(HERE.parent)
    rows = []
    for case in args.cases.split(","):
        done = subprocess.run([sys.executable, __file__, "worker", case, str(work), root], capture_output=True,
                              text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        rows.append((case, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"quantkit from {root}/quantkit; CPU s on one torch thread, first call in a process / second call")
    print("| case | total | " + " | ".join(STAGES) + " |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for case, (first, second) in rows:
        cells = [f"{first.get(s, 0):.2f} / {second.get(s, 0):.2f}" if s in first else "-" for s in STAGES]
        print(f"| {case} | {first['total']:.2f} / {second['total']:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
