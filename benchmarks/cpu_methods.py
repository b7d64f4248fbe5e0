"""Every quantkit method on the real small model, on CPU: one table of quality, size and time.

    QUANTKIT_CACHE=/work/qk-cache python benchmarks/cpu_methods.py [--quick] [--methods rtn,gptq]

Each row is one ``pipeline.run`` of ``builtin:smollm2-135m`` (SmolLM2-135M-Instruct, bf16)
with the same calibration text (``shakespeare``) and evaluation text (``shakespeare-eval``).
Perplexity comes from the engine's streaming pass (base and quantized in one pass), which
runs each quantized layer with its dequantized weights and, for W8A8 and FP8, its inputs
fake-quantized the way the server will (per token when dynamic, with the exported
``input_scale`` when static). FP8 KV-cache scales are exported but not simulated.

Time is the whole run on CPU: quantization plus the base and quantized evaluation passes and
the export. Size is the checkpoint's safetensors on disk (embeddings stay bf16 in every row).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit import pipeline  # noqa: E402
from quantkit.recipe import make_recipe  # noqa: E402

MODEL = "builtin:smollm2-135m"

# key: (label, quantization section, export format or None for the method's default)
METHODS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "rtn": ("rtn W4A16 g64 sym", {"method": "rtn", "bits": 4, "group_size": 64}, None),
    "gptq": ("gptq W4A16 g64 sym, act_order static_groups",
             {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "static_groups": True}, None),
    "gptq-asym": ("gptq W4A16 g64 asym, act_order static_groups",
                  {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False, "act_order": True,
                   "static_groups": True}, None),
    "awq": ("awq W4A16 g64 asym", {"method": "awq", "bits": 4, "group_size": 64, "symmetric": False}, "awq"),
    "int8-dyn-rtn": ("dynamic_int8 W8A8, rtn weights", {"method": "dynamic_int8"}, None),
    "int8-dyn-gptq-sq": ("dynamic_int8 W8A8, gptq weights + smoothquant 0.5",
                         {"method": "dynamic_int8", "weight_method": "gptq", "smoothquant_alpha": 0.5}, None),
    "int8-static-minmax": ("static_int8 W8A8, minmax observer", {"method": "static_int8", "observer": "minmax"},
                           None),
    "int8-static-mse-sq": ("static_int8 W8A8, mse observer + smoothquant 0.75",
                           {"method": "static_int8", "observer": "mse", "smoothquant_alpha": 0.75}, None),
    "fp8-dynamic": ("fp8 W8A8 dynamic, per-channel weights", {"method": "fp8"}, None),
    "fp8-static-kv": ("fp8 W8A8 static + fp8 kv_cache", {"method": "fp8", "activations": "static", "kv_cache": True},
                      None),
    # SmolLM2's q_proj (576 rows) is not a whole number of 128-row blocks, which vLLM's fused
    # qkv_proj refuses; 64x64 blocks divide every Linear.
    "fp8-block": ("rtn FP8_BLOCK 64x64 (W8A8, per-token-group activations)",
                  {"method": "rtn", "scheme": "FP8_BLOCK", "block_structure": [64, 64]}, None),
    "fp8-block-gptq": ("gptq FP8_BLOCK 64x64", {"method": "gptq", "scheme": "FP8_BLOCK", "block_structure": [64, 64]},
                       None),
    "nvfp4a16-rtn": ("rtn NVFP4A16", {"method": "rtn", "scheme": "NVFP4A16"}, None),
    "nvfp4a16-gptq": ("gptq NVFP4A16, act_order static_groups",
                      {"method": "gptq", "scheme": "NVFP4A16", "act_order": True, "static_groups": True}, None),
    "nvfp4-rtn": ("rtn NVFP4 (W4A4)", {"method": "rtn", "scheme": "NVFP4"}, None),
    "nvfp4-gptq": ("gptq NVFP4 (W4A4), act_order static_groups",
                   {"method": "gptq", "scheme": "NVFP4", "act_order": True, "static_groups": True}, None),
    "mxfp4a16-rtn": ("rtn MXFP4A16", {"method": "rtn", "scheme": "MXFP4A16"}, None),
    "mxfp4a16-gptq": ("gptq MXFP4A16, act_order static_groups",
                      {"method": "gptq", "scheme": "MXFP4A16", "act_order": True, "static_groups": True}, None),
    "w4a8-gptq": ("gptq W4A8 g64 (int8 per-token activations), act_order static_groups",
                  {"method": "gptq", "scheme": "W4A8", "group_size": 64, "act_order": True, "static_groups": True},
                  None),
    "mixed-gptq": ("gptq W4A16 g64, down_proj W8A16 g64 (mixed), act_order static_groups",
                   {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "static_groups": True,
                    "overrides": [{"targets": ["re:.*down_proj$"], "bits": 8}]}, None),
}


def run_one(key: str, calib: tuple[int, int], evaluation: tuple[int, int], out_root: Path) -> dict[str, Any]:
    label, quant, fmt = METHODS[key]
    out_dir = out_root / key
    recipe = make_recipe({
        "model": {"id": MODEL},
        "quantization": quant,
        "calibration": {"source": "shakespeare", "num_samples": calib[0], "max_seq_length": calib[1]},
        "evaluate": {"source": "shakespeare-eval", "num_samples": evaluation[0], "max_seq_length": evaluation[1]},
        "export": {"output_dir": str(out_dir), "overwrite": True, **({"format": fmt} if fmt else {})},
        "device": "cpu",
    }, where=f"benchmark {key}")
    started = time.perf_counter()
    report = pipeline.run(recipe, quiet=True)
    seconds = time.perf_counter() - started
    ev = report["evaluation"]
    return {
        "key": key, "label": label, "format": report["format"], "scheme": report["scheme_name"],
        "ppl_base": ev["perplexity_base"], "ppl": ev["perplexity_quantized"],
        "size": sum(f.stat().st_size for f in out_dir.glob("*.safetensors")),
        "base_size": report["size_bytes"]["base"], "seconds": seconds,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | scheme | format | ppl base | ppl quantized | Δ ppl | size (MB) | time on CPU (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    if rows:
        r0 = rows[0]
        lines.append(f"| base (no quantization) | bf16 | safetensors | {r0['ppl_base']:.3f} | {r0['ppl_base']:.3f} "
                     f"| — | {r0['base_size'] / 1e6:.1f} | — |")
    for r in rows:
        delta = 100.0 * (r["ppl"] / r["ppl_base"] - 1.0)
        lines.append(f"| {r['label']} | {r['scheme']} | {r['format']} | {r['ppl_base']:.3f} | {r['ppl']:.3f} "
                     f"| {delta:+.2f}% | {r['size'] / 1e6:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run_parallel(keys: list[str], args: argparse.Namespace, calib, evaluation) -> list[dict[str, Any]]:
    """Each row in its own single-threaded process, ``args.jobs`` at a time; rows in ``keys`` order."""
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, done = list(keys), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            key = pending.pop(0)
            out = args.out / f"{key}.row.json"
            cmd = [sys.executable, __file__, "--methods", key, "--calib", f"{calib[0]}x{calib[1]}",
                   "--eval", f"{evaluation[0]}x{evaluation[1]}", "--out", str(args.out), "--row-json", str(out)]
            print(f"[{key}] running ...", file=sys.stderr, flush=True)
            running[key] = (subprocess.Popen(cmd, env=env), out)
        time.sleep(2)
        for key, (proc, out) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            if proc.returncode != 0:
                raise SystemExit(f"row {key} failed (exit {proc.returncode})")
            done[key] = json.loads(out.read_text())
            r = done[key]
            print(f"[{key}] ppl {r['ppl']:.3f} (base {r['ppl_base']:.3f}), {r['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
    return [done[k] for k in sorted(keys, key=list(METHODS).index)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16x128 calibration, 8x128 evaluation (a smoke run)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--calib", default="64x256", help="calibration samples x tokens (default 64x256)")
    ap.add_argument("--eval", default="16x256", help="evaluation windows x tokens (default 16x256)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows run in this many processes at once, one thread each (for a shared, busy machine)")
    ap.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, help="also write the header and table to this file, after every row")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "quantkit-bench",
                    help="where the checkpoints are written (one folder per method)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    calib = (16, 128) if args.quick else tuple(int(v) for v in args.calib.split("x"))
    evaluation = (8, 128) if args.quick else tuple(int(v) for v in args.eval.split("x"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    header = (f"quantkit methods on {MODEL} (SmolLM2-135M-Instruct), CPU: {os.cpu_count()} cores, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.machine()}, {date.today()}\n"
              f"calibration: shakespeare {calib[0]}x{calib[1]} tokens; evaluation: shakespeare-eval "
              f"{evaluation[0]}x{evaluation[1]} tokens; W8A8/FP8 perplexity includes activation fake-quantization\n")
    if args.row_json:  # a worker of --jobs: one row, as JSON
        args.row_json.write_text(json.dumps(run_one(keys[0], calib, evaluation, args.out)))
        return 0
    rows = []
    if args.jobs > 1:
        rows = run_parallel(keys, args, calib, evaluation)
        header = header.replace(f"({torch.get_num_threads()} threads)", f"({args.jobs} rows at once, 1 thread each)")
    for key in keys if args.jobs <= 1 else []:
        print(f"[{key}] running ...", file=sys.stderr, flush=True)
        rows.append(run_one(key, calib, evaluation, args.out))
        r = rows[-1]
        print(f"[{key}] ppl {r['ppl']:.3f} (base {r['ppl_base']:.3f}), {r['seconds']:.0f} s", file=sys.stderr, flush=True)
        if args.save:
            args.save.write_text(header + "\n" + table(rows) + "\n")
    print(header)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
