"""quantkit on 1, 2 and 4 GPUs of one host: the same GPTQ run, wall time and speedup.

    python benchmarks/distributed_scaling.py --work /tmp/qk-dist    # 70B x8 and Qwen3-30B-A3B x4, 1/2/4 GPUs
    python benchmarks/distributed_scaling.py --shape tiny,tiny-moe --gpus 1,2 --device cpu --samples 8 --seq-len 64
    python benchmarks/distributed_scaling.py --shape deepseek-v3 --layers 2 --routed --work /tmp/qk-dist  # issue 17.5
    python benchmarks/distributed_scaling.py --shape deepseek-v3 --layers 2 --routed --input-feedback  # GPTAQ

The models are Llama-3.1-70B-shaped (real hidden, intermediate, head and vocabulary sizes) with
8 random decoder layers and Qwen3-30B-A3B-shaped (128 experts, every token through every expert
while calibrating) with 4 (``--layers`` overrides both), built once under ``--work`` by
gpu_vs_llmcompressor.py's builders, with 128 x 2048 random calibration token ids. Each shape
and GPU count runs
``torchrun --standalone --nproc-per-node N`` on this file's worker, which calls
``quantkit.quantize`` (evaluation off) and writes per rank: wall time, peak GPU memory
(``torch.cuda.max_memory_allocated``), peak host RSS (``VmHWM``), and the time that rank spent
observing (calibration forward, hooks and the statistics' reduce) and solving (its owned
units plus the broadcasts). The table gives the speedup against the shape's one-GPU run and a
full-model estimate (80 layers for the 70B, 48 for Qwen3-30B-A3B) per GPU count: fixed cost +
layers x (per-layer + export per layer).
With ``--routed`` each expert is calibrated on its routed tokens only (one Hessian per expert
gate/up: DeepSeek-V3's ~57 GB a layer), the case where a layer's statistics do not fit one GPU:
each rank holds only its own experts' statistics, so the calibration passes per layer (the
``passes`` column: observe calls per layer on rank 0, one of them the routed-token count) and
the peak GPU drop with more GPUs. ``--input-feedback`` runs GPTAQ (the shipped 4-bit recipes'
setting): the float stream beside the quantized one and two statistics per expert input (the
quantized inputs' Hessian and the cross term), also held by each expert's owner alone.
With ``--device cpu`` the ranks use gloo (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_vs_llmcompressor as peer  # noqa: E402  (model builder shared with the one-GPU benchmark)

GIB = 1024**3
peer.SHAPES.setdefault("tiny", dict(config=dict(peer._LLAMA3, hidden_size=256, intermediate_size=512,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                                vocab_size=512), full_layers=80, name="tiny (script check)"))
peer.MOE_SHAPES.setdefault("tiny-moe", dict(model_type="qwen3_moe", full_layers=48, name="tiny MoE (script check)",
                                            config=dict(peer._TINY["qwen3_moe"], norm_topk_prob=True)))
DEFAULT_LAYERS = {"70b": 8, "qwen3-30b-a3b": 4}


def worker(args: argparse.Namespace) -> None:
    """One rank: the whole run, timed; rank-local numbers to ``rank<r>.json``."""
    import torch

    import quantkit
    from quantkit import distributed, engine

    cuda = args.device == "cuda"
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}

    def timed(owner, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            calls[stage] = calls.get(stage, 0) + 1
            try:
                return fn(*a, **k)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t

        setattr(owner, attr, wrapped)

    timed(engine._LayerCalibration, "observe", "observe")
    timed(engine._LayerCalibration, "observe_paired", "observe")
    timed(distributed.World, "solve", "solve")
    recipe = peer._quantkit_recipe("gptq", Path(args.model), Path(args.calib), Path(args.out), args.samples,
                                   args.seq_len, args.batch_size)
    recipe["device"] = args.device
    if args.routed:
        recipe["calibration"]["all_experts"] = False
    recipe["quantization"]["input_feedback"] = args.input_feedback
    if not cuda:
        recipe["model"]["dtype"] = "float32"
    t0 = time.perf_counter()
    report = quantkit.quantize(**recipe, quiet=True)
    wall = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", "0"))
    out = {"rank": rank, "wall_s": wall, "rss_gib": peer._peak_rss_bytes() / GIB, "spent": spent, "calls": calls,
           "gpu_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0}
    if report:
        out.update(phases=report["timing"]["phase_seconds"], layer_seconds=report["timing"]["layer_seconds"])
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(out, indent=2))


def build(shape: str, layers: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folder and calibration ids of ``shape`` under ``--work`` (built once)."""
    work = Path(args.work)
    if shape in peer.MOE_SHAPES:
        model = peer.build_moe_model(shape, layers, work / f"model-{shape}-{layers}")
        vocab = peer.MOE_SHAPES[shape]["config"].get("vocab_size", peer.CALIBRATION_VOCAB)
    else:
        model = peer.build_model(shape, layers, work / f"model-{shape}-{layers}")
        vocab = peer.SHAPES[shape]["config"].get("vocab_size", peer.CALIBRATION_VOCAB)
    calib = peer.build_calibration(work / f"calib-{args.samples}x{args.seq_len}-{vocab}.safetensors", args.samples,
                                   args.seq_len, vocab=vocab)
    return model, calib


def run_gpus(n: int, args: argparse.Namespace, model: Path, calib: Path) -> dict:
    results = Path(args.work) / f"ranks-{model.name}-{n}"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    out = Path(args.work) / f"out-{model.name}-{n}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
           "worker", "--model", str(model), "--calib", str(calib), "--out", str(out), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device,
           "--result-dir", str(results)] + (["--routed"] if args.routed else []) + \
        (["--input-feedback"] if args.input_feedback else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(peer.ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or n) // n))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    launched = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(n)]
    shutil.rmtree(out, ignore_errors=True)
    return {"ranks": ranks, "launch_wall_s": launched, **{k: ranks[0][k] for k in ("phases", "layer_seconds")}}


def table(results: dict[tuple[str, int], dict], layers: dict[str, int]) -> str:
    lines = ["| shape | GPUs | wall s (rank 0) | speedup | s/layer | passes/layer | observe s (max rank) | "
             "solve s (max rank) | peak GPU GiB per rank | peak RSS GiB per rank | est. full model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, n), r in results.items():
        spec = peer.MOE_SHAPES.get(shape) or peer.SHAPES[shape]
        name, full = f"{spec['name']} x{layers[shape]}", spec["full_layers"]
        if "error" in r:
            lines.append(f"| {name} | {n} | failed: {r['error']} | | | | | | | | |")
            continue
        base = results.get((shape, 1), {}).get("ranks", [{}])[0].get("wall_s")
        ranks, r0 = r["ranks"], r["ranks"][0]
        per_layer = sum(r["layer_seconds"]) / len(r["layer_seconds"])
        export = r["phases"].get("export", 0.0)
        fixed = r0["wall_s"] - sum(r["layer_seconds"]) - export
        est = fixed + full * (per_layer + export / layers[shape])
        speed = f"{base / r0['wall_s']:.2f}x" if base else "-"
        gpu = " / ".join(f"{x['gpu_gib']:.1f}" for x in ranks)
        rss = " / ".join(f"{x['rss_gib']:.1f}" for x in ranks)
        obs = max(x["spent"].get("observe", 0.0) for x in ranks)
        sol = max(x["spent"].get("solve", 0.0) for x in ranks)
        passes = r0.get("calls", {}).get("observe", 0) / layers[shape]
        lines.append(f"| {name} | {n} | {r0['wall_s']:.1f} | {speed} | {per_layer:.2f} | {passes:.1f} | {obs:.1f} | "
                     f"{sol:.1f} | "
                     f"{gpu} | {rss} | ~{est / 60:.1f} min ({full} layers) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv and argv[0] == "worker":
        for name in ("--model", "--calib", "--out", "--device", "--result-dir"):
            ap.add_argument(name, required=True)
        for name in ("--samples", "--seq-len", "--batch-size"):
            ap.add_argument(name, type=int, required=True)
        ap.add_argument("--routed", action="store_true")
        ap.add_argument("--input-feedback", action="store_true")
        worker(ap.parse_args(argv[1:]))
        return 0
    ap.add_argument("--shape", default="70b,qwen3-30b-a3b",
                    help=f"comma-separated, of {', '.join(sorted([*peer.SHAPES, *peer.MOE_SHAPES]))}")
    ap.add_argument("--layers", type=int, help="decoder layers of every shape (default: 8 for the 70B, 4 for MoE)")
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--work", default="/tmp/quantkit-dist-bench")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--routed", action="store_true",
                    help="calibrate each expert on its routed tokens only (per-expert Hessians; issue 17 point 5)")
    ap.add_argument("--input-feedback", action="store_true",
                    help="GPTAQ (gptq input_feedback): the float stream beside the quantized one, two statistics "
                    "per input")
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    shapes = args.shape.split(",")
    unknown = [s for s in shapes if s not in peer.SHAPES and s not in peer.MOE_SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}")
    layers = {s: args.layers or DEFAULT_LAYERS.get(s, 4 if s in peer.MOE_SHAPES else 8) for s in shapes}
    results: dict[tuple[str, int], dict] = {}
    for shape in shapes:
        model, calib = build(shape, layers[shape], args)
        os.sync()  # the model just written must not be flushed to disk during a timed run
        for n in (int(x) for x in args.gpus.split(",")):
            results[shape, n] = run_gpus(n, args, model, calib)
            print(f"{shape} on {n} GPU(s): {json.dumps(results[shape, n])[:300]}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({f"{s} x{n}": r for (s, n), r in results.items()}, indent=2))
    print(f"\nGPTQ W4A16 g128 (act_order, static groups{', GPTAQ input feedback' if args.input_feedback else ''}), "
          f"{args.samples} x {args.seq_len} calibration tokens, "
          f"batch {args.batch_size}, device {args.device}; MoE experts calibrated on "
          f"{'their routed tokens' if args.routed else 'every token'}; estimate for the "
          "full model = fixed + layers x (s/layer + export/layer)")
    print(table(results, layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
