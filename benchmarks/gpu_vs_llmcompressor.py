"""quantkit vs llm-compressor on one GPU, on random-weight models with real Llama layer shapes.

    python benchmarks/gpu_vs_llmcompressor.py --work /tmp/qk-bench            # every case
    python benchmarks/gpu_vs_llmcompressor.py --cases gptq-8b-4,gptq-70b-2    # some cases
    python benchmarks/gpu_vs_llmcompressor.py --tools quantkit                # peers from the reference table

Each case builds (once, cached under ``--work``) a Llama-3.1-8B- or 70B-shaped model with a few
decoder layers of random weights (real hidden, intermediate, head and vocabulary sizes) as
bf16 safetensors, plus 128 x 2048 random calibration token ids in a ``.safetensors`` file.
quantkit (``quantkit.quantize``, calibration ``source`` = that token file, evaluation off) and
llm-compressor (``oneshot`` on the model loaded on the CPU, which its sequential pipeline
onloads one layer at a time, with a ``datasets.Dataset`` of the same ids) each run in their
own subprocess, which reports wall time, peak GPU memory (``torch.cuda.max_memory_allocated``),
peak host RSS (``VmHWM``) and the checkpoint's size. Wall time is end to end for both: read
the model from disk, calibrate and quantize, write the checkpoint (llm-compressor's ``oneshot``
alone is reported too). Without llm-compressor installed, or with ``--tools quantkit``, the
peer numbers are the reference measurements below, and the table says so.

Also printed: quantkit's time per stage per layer (a profile: calibration forward, Hessian
accumulation, GPTQ solve, AWQ search, saving, propagation, export) and full-model
extrapolations for Llama-3.1-8B (32 layers) and 70B (80 layers) from the per-layer time.
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

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               full_layers=32, name="Llama-3.1-8B"),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                full_layers=80, name="Llama-3.1-70B"),
}
# case: (shape, decoder layers, method)
CASES = {
    "gptq-8b-2": ("8b", 2, "gptq"),
    "gptq-8b-4": ("8b", 4, "gptq"),
    "gptq-70b-2": ("70b", 2, "gptq"),
    "awq-8b-4": ("8b", 4, "awq"),
    "w8a8-8b-4": ("8b", 4, "w8a8"),
    "fp8-8b-4": ("8b", 4, "fp8"),
}
# llm-compressor 0.14.0.1 on one H100, same shapes, 128 x 2048 calibration tokens, model on the
# CPU onloaded per layer (measured before this benchmark existed; its wall time is oneshot's).
REFERENCE = {
    "gptq-8b-4": dict(wall_s=32.6, gpu_gib=3.8, rss_gib=15.4),
    "gptq-70b-2": dict(wall_s=52.7, gpu_gib=14.9, rss_gib=14.0),
    "awq-8b-4": dict(wall_s=70.3, gpu_gib=50.7, rss_gib=20.8),
    "w8a8-8b-4": dict(wall_s=40.9, gpu_gib=3.8, rss_gib=25.6),
    "fp8-8b-4": dict(wall_s=0.7, gpu_gib=2.5, rss_gib=5.6),
}
VOCAB = 128256
GIB = 1024**3


# ---------------------------------------------------------------- model and calibration set

def build_model(shape: str, layers: int, folder: Path, seed: int = 0) -> Path:
    """A LlamaForCausalLM folder with ``layers`` random decoder layers (bf16, std 0.02)."""
    import torch
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = SHAPES[shape]
    h, inter, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    hd = h // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)

    def rand(*shape_):
        return (torch.randn(*shape_, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    weight_map = {}
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(VOCAB, h),
                                          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
              "model-head.safetensors": {"lm_head.weight": rand(VOCAB, h)}}
    for name, tensors in shards.items():
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(heads * hd, h), p + "self_attn.k_proj.weight": rand(kv * hd, h),
             p + "self_attn.v_proj.weight": rand(kv * hd, h), p + "self_attn.o_proj.weight": rand(h, heads * hd),
             p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
             p + "mlp.down_proj.weight": rand(h, inter),
             p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"model-layer-{i:03d}.safetensors"
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        del t
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(tmp)
    os.replace(tmp, folder)
    return folder


def write_tokenizer(folder: Path) -> None:
    """A stand-in tokenizer (the token ids come from a file; both tools only load it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(str(folder))


def build_calibration(path: Path, n: int, length: int, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    if not path.is_file():
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (n, length), generator=g)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids}, str(path))
    return path


# ---------------------------------------------------------------- workers (own process each)

def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _quantkit_recipe(method: str, model: Path, calib: Path, out: Path, n: int, length: int, batch: int) -> dict:
    q = {
        "gptq": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "static_groups": True},
        "awq": {"method": "awq", "bits": 4, "group_size": 128, "symmetric": False},
        "w8a8": {"method": "dynamic_int8", "weight_method": "gptq", "smoothquant_alpha": 0.8, "act_order": True},
        "fp8": {"method": "fp8", "weight_strategy": "channel", "activations": "dynamic"},
    }[method]
    return {"model": {"id": str(model), "dtype": "bfloat16"}, "quantization": q,
            "calibration": {"source": str(calib), "num_samples": n, "max_seq_length": length, "batch_size": batch},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(out), "overwrite": True}, "device": "cuda"}


class _Profile:
    """Wraps quantkit's numerics functions with synchronised timers (a few syncs per call)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, stage: str) -> None:
        import torch

        fn = getattr(owner, attr)

        def timed(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.synchronize()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def worker_quantkit(method: str, model: Path, calib: Path, out: Path, n: int, length: int, batch: int) -> dict:
    import torch

    import quantkit
    from quantkit import engine
    from quantkit.quantizers import awq, gptq, hessian, int8_dynamic, smoothquant

    prof = _Profile()
    prof.wrap(hessian.HessianAccumulator, "add", "hessian accumulation")
    prof.wrap(gptq, "gptq_quantize", "gptq solve")
    prof.wrap(awq, "awq_scale_search", "awq scale search")
    prof.wrap(awq, "awq_clip_search", "awq clip search")
    prof.wrap(int8_dynamic, "smooth_layer", "smoothquant (incl. its forward)")
    prof.wrap(engine._LayerCalibration, "observe", "calibration forward (incl. hooks)")
    torch.cuda.init()
    t0 = time.perf_counter()
    report = quantkit.quantize(**_quantkit_recipe(method, model, calib, out, n, length, batch), quiet=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "gpu_gib": torch.cuda.max_memory_allocated() / GIB,
            "gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "rss_gib": _peak_rss_bytes() / GIB,
            "out_gib": _dir_bytes(out) / GIB, "phases": report["timing"]["phase_seconds"],
            "layer_seconds": report["timing"]["layer_seconds"], "profile": prof.seconds}


def worker_llmcompressor(method: str, model_dir: Path, calib: Path, out: Path, n: int, length: int) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = {
        "gptq": lambda: GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        "awq": lambda: AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"]),
        "w8a8": lambda: [SmoothQuantModifier(smoothing_strength=0.8),
                         GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "fp8": lambda: QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
    }[method]()
    torch.cuda.init()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    ids = load_file(str(calib))["input_ids"][:n, :length]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t1 = time.perf_counter()
    kwargs = {} if method == "fp8" else {"dataset": ds, "num_calibration_samples": n, "max_seq_length": length}
    oneshot(model=model, recipe=recipe, **kwargs)
    t2 = time.perf_counter()
    model.save_pretrained(str(out), save_compressed=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "oneshot_s": t2 - t1, "gpu_gib": torch.cuda.max_memory_allocated() / GIB,
            "gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "rss_gib": _peak_rss_bytes() / GIB,
            "out_gib": _dir_bytes(out) / GIB}


# ---------------------------------------------------------------- driver

def run_case(case: str, tool: str, work: Path, n: int, length: int, batch: int, timeout: float) -> dict:
    shape, layers, method = CASES[case]
    model = build_model(shape, layers, work / f"model-{shape}-{layers}")
    calib = build_calibration(work / f"calib-{n}x{length}.safetensors", n, length)
    os.sync()  # the model just written must not be flushed to disk during a timed run
    out = work / f"out-{case}-{tool}"
    result_file = work / f"result-{case}-{tool}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "worker", tool, method, str(model), str(calib), str(out), str(n), str(length),
           str(batch), str(result_file)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = work / f"log-{case}-{tool}.txt"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0 or not result_file.is_file():
        tail = log.read_text()[-3000:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(result_file.read_text())


def have_llmcompressor() -> bool:
    import importlib.util

    return importlib.util.find_spec("llmcompressor") is not None


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def table(results: dict, peers_measured: bool) -> str:
    peer = "llm-compressor (measured here)" if peers_measured else "llm-compressor (reference table)"
    lines = [f"| case | quantkit wall s | {peer} wall s | ratio | quantkit GPU GiB | peer GPU GiB | ratio | "
             "quantkit RSS GiB | peer RSS GiB | ratio | quantkit out GiB | peer out GiB |",
             "|" + "---|" * 13]
    for case, r in results.items():
        q = r.get("quantkit", {})
        p = r.get("llmcompressor") or REFERENCE.get(case, {})
        src = "" if "llmcompressor" in r else " (ref)" if case in REFERENCE else ""
        if "error" in q:
            lines.append(f"| {case} | quantkit failed: {q['error']} |")
            continue
        if "error" in p:
            p, src = REFERENCE.get(case, {}), " (ref; llmc failed)"
        cells = [case + src]
        for key in ("wall_s", "gpu_gib", "rss_gib"):
            cells += [f"{q.get(key, 0):.1f}", f"{p[key]:.1f}" if key in p else "-", fmt_ratio(q.get(key), p.get(key))]
        cells += [f"{q.get('out_gib', 0):.2f}", f"{p['out_gib']:.2f}" if "out_gib" in p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table(results: dict) -> str:
    lines = ["| case | s/layer | " + " | ".join(["stage: seconds per layer"]) + " |", "|---|---|---|"]
    for case, r in results.items():
        q = r.get("quantkit", {})
        if "phases" not in q:
            continue
        layers = CASES[case][1]
        per_layer = sum(q["layer_seconds"]) / max(len(q["layer_seconds"]), 1)
        stages = {**{f"engine.{k}": v for k, v in q["phases"].items()}, **q["profile"]}
        cells = ", ".join(f"{k} {v / layers:.2f}" for k, v in stages.items())
        lines.append(f"| {case} | {per_layer:.2f} | {cells} |")
    return "\n".join(lines)


def extrapolation(results: dict) -> str:
    lines = ["| model | from case | quantkit s/layer | fixed s | est. full model (quantkit) | "
             "est. full model (llm-compressor, same method) |", "|---|---|---|---|---|---|"]
    for case, r in results.items():
        q = r.get("quantkit", {})
        if "layer_seconds" not in q or not q["layer_seconds"]:
            continue
        shape, layers, _ = CASES[case]
        full = SHAPES[shape]["full_layers"]
        per_layer = sum(q["layer_seconds"]) / len(q["layer_seconds"])
        # export and embedding scale with layers too: charge export per layer, the rest is fixed
        export_per_layer = q["phases"].get("export", 0.0) / layers
        fixed = q["wall_s"] - sum(q["layer_seconds"]) - q["phases"].get("export", 0.0)
        est = fixed + full * (per_layer + export_per_layer)
        p = r.get("llmcompressor") or REFERENCE.get(case)
        peer = "-"
        if p and "wall_s" in p:
            peer = f"~{p['wall_s'] / layers * full / 60:.1f} min (linear in layers)"
        lines.append(f"| {SHAPES[shape]['name']} ({full} layers) | {case} | {per_layer:.2f} | {fixed:.1f} | "
                     f"~{est / 60:.1f} min | {peer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        tool, method, model, calib, out, n, length, batch, result = argv[1:]
        if tool == "quantkit":
            r = worker_quantkit(method, Path(model), Path(calib), Path(out), int(n), int(length), int(batch))
        else:
            r = worker_llmcompressor(method, Path(model), Path(calib), Path(out), int(n), int(length))
        Path(result).write_text(json.dumps(r, indent=2))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tools", default="quantkit,llmcompressor")
    ap.add_argument("--work", default="/tmp/quantkit-gpu-bench")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="quantkit calibration.batch_size")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--peer-results", help="an earlier run's --json: take llm-compressor's rows from it "
                    "instead of running it again (same machine kind, same cases)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = args.tools.split(",")
    if "llmcompressor" in tools and not have_llmcompressor():
        print("llm-compressor is not installed here: peers are the reference table's numbers", flush=True)
        tools.remove("llmcompressor")
    results: dict = {}
    earlier = json.loads(Path(args.peer_results).read_text()) if args.peer_results else {}
    for case in args.cases.split(","):
        results[case] = {}
        for tool in tools:
            old = earlier.get(case, {}).get(tool)
            if tool == "llmcompressor" and old and "error" not in old:
                results[case][tool] = {**old, "from": args.peer_results}
                print(f"{case} {tool}: from {args.peer_results}", flush=True)
                continue
            t = time.perf_counter()
            results[case][tool] = r = run_case(case, tool, work, args.samples, args.seq_len, args.batch_size,
                                               args.timeout)
            print(f"{case} {tool}: {json.dumps({k: v for k, v in r.items() if k != 'log_tail'})[:400]} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            if "log_tail" in r:
                print(r["log_tail"], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    measured = any("llmcompressor" in r for r in results.values())
    print()
    print(table(results, measured))
    print("\nquantkit per-layer profile (stages are nested: calibration forward includes the hooks' "
          "Hessian accumulation; quantize includes forward, hooks and solve)")
    print(profile_table(results))
    print("\nExtrapolation to full models (per-layer time x layers + fixed cost; an estimate, not a run)")
    print(extrapolation(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
