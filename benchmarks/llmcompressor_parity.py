"""Quality parity with llm-compressor: GPTQ and AWQ W4A16 g64 on the same model and tokens.

    bash scripts/llmcompressor_venv.sh /work/llmc-venv          # once: the reference's venv
    QUANTKIT_CACHE=/work/qk-cache python benchmarks/llmcompressor_parity.py \
        --llmc-python /work/llmc-venv/bin/python [--calib 32x256] [--eval 16x256] [--methods gptq,awq] \
        [--seeds 0,1,2,3]

Steps, all on CPU:
1. (this venv) the calibration and evaluation token ids quantkit uses (``shakespeare`` and
   ``shakespeare-eval``, packed, as the pipeline loads them) are written to a tokens file, one
   per calibration seed (the seed shuffles which passages are drawn; evaluation is the same);
2. (this venv) quantkit quantizes builtin:smollm2-135m with each method, exporting
   compressed-tensors;
3. (llm-compressor's venv, a subprocess) ``oneshot`` runs GPTQModifier / AWQModifier +
   QuantizationModifier on the same model folder with the same calibration ids (a
   datasets.Dataset of input_ids, unshuffled) and the same settings: GPTQ symmetric g64,
   dampening 0.01, block 128, static act-order; AWQ asymmetric g64, grid 20;
4. (llm-compressor's venv) every checkpoint (base, quantkit's, llm-compressor's) is loaded
   with transformers and its perplexity measured on the same evaluation ids by the same code.

Time is quantize + save wall clock (model load included for quantkit, not for oneshot).

With several ``--seeds`` every step runs once per calibration draw and the table adds the mean
over seeds: one GPTQ run moves by a few tenths of a perplexity point with nothing but float
summation order changed, so a single draw cannot rank two implementations of the same
algorithm.

``--level module`` is the cheap variant for machines where a whole-model oneshot does not fit
the time (llm-compressor's GPTQ column loop costs seconds per Linear on 2 CPU cores): the
Hessians of chosen decoder layers' Linears are gathered once from the float model on the
calibration ids, and quantkit's ``gptq_quantize`` and llm-compressor's ``quantize_weight``
(with its min-max observer's group scales) each quantize the same weight with the same
Hessian. Reported per Linear: the relative calibration output error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of quantkit, llm-compressor and RTN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m"

QUANTKIT = {
    "gptq": {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True, "act_order": True,
             "static_groups": True, "dampening_frac": 0.01, "block_size": 128},
    "awq": {"method": "awq", "bits": 4, "group_size": 64, "symmetric": False, "grid": 20},
}
LABELS = {"gptq": "GPTQ W4A16 g64 sym (act-order static, damp 0.01, block 128)",
          "awq": "AWQ W4A16 g64 asym (grid 20)"}


def _pair(text: str) -> tuple[int, int]:
    n, length = text.lower().split("x")
    return int(n), int(length)


# ---- step 1 and 2: this venv (quantkit) ---------------------------------------------------

def dump_tokens(model_dir: Path, calib: tuple[int, int], evaluation: tuple[int, int], seed: int, path: Path) -> None:
    """The exact token ids pipeline.run loads for these calibration/evaluate sections."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantkit.calibration import TextRequest, load_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    cal = load_tokens(TextRequest("shakespeare", calib[0], calib[1], True, seed, True), tok, model_dir)
    ev = load_tokens(TextRequest("shakespeare-eval", evaluation[0], evaluation[1], True, 0, False), tok, model_dir)
    save_file({"calibration": torch.stack(cal), "evaluation": torch.stack(ev)}, str(path))


def quantkit_quantize(method: str, calib: tuple[int, int], seed: int, out_dir: Path) -> float:
    from quantkit import pipeline
    from quantkit.recipe import make_recipe

    recipe = make_recipe({
        "model": {"id": MODEL},
        "quantization": QUANTKIT[method],
        "calibration": {"source": "shakespeare", "num_samples": calib[0], "max_seq_length": calib[1],
                        "seed": seed},
        "evaluate": {"enabled": False},
        "export": {"output_dir": str(out_dir), "format": "compressed-tensors", "overwrite": True},
        "device": "cpu",
    }, where=f"parity {method}")
    started = time.perf_counter()
    pipeline.run(recipe, quiet=True)
    return time.perf_counter() - started


# ---- step 3 and 4: llm-compressor's venv (no quantkit import) -----------------------------

def llmc_quantize(method: str, model_dir: Path, tokens: Path, out_dir: Path) -> float:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(str(tokens))["calibration"]
    if not torch.cuda.is_available():
        # 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which raises
        # without an accelerator; pinning changes no value, so skip it on a CPU-only machine.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    # fp32 like quantkit's CPU compute (bf16 matmuls are several times slower on these CPUs).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    symmetric = QUANTKIT[method]["symmetric"]
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64,
                               actorder="static" if method == "gptq" else None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01)]
    else:
        recipe = [AWQModifier(n_grid=20), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    started = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(out_dir, save_compressed=True)
    tok.save_pretrained(out_dir)
    return time.perf_counter() - started


def perplexity(checkpoint: Path, tokens: Path, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of a transformers-loaded checkpoint over the evaluation ids."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(str(tokens))["evaluation"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model_perplexity(model, ids, batch_size)


def model_perplexity(model, ids, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of a model in memory over ``ids`` (the peers' scoring, which
    block_rounding_probe.py applies to its fake-quantized model too)."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in ids.split(batch_size):
            logits = model(b).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
            count += b[:, 1:].numel()
    return math.exp(nll / count)


def capture_hessians(model_dir: Path, tokens: Path, layers: list[int], out: Path) -> None:
    """``{name}.weight`` and ``{name}.hessian`` (``2/n Σ x xᵀ``, float32) of every Linear in
    ``layers``, from one forward of the float model over the calibration ids."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(str(tokens))["calibration"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for i in layers:
        for name, mod in model.model.layers[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                full = f"model.layers.{i}.{name}"

                def hook(_m, args, full=full):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[full] = sums.get(full, 0) + x.T @ x
                    counts[full] = counts.get(full, 0) + x.shape[0]

                handles.append(mod.register_forward_pre_hook(hook))
    last = max(layers)
    model.model.layers = model.model.layers[: last + 1]  # nothing after the last asked-for layer
    with torch.no_grad():
        for b in ids.split(4):
            model.model(b)
    tensors = {}
    for name in sums:
        tensors[f"{name}.weight"] = model.get_submodule(name).weight.detach().float().contiguous()
        tensors[f"{name}.hessian"] = (2.0 * sums[name] / counts[name]).float().contiguous()
    save_file(tensors, str(out))


def _module_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted(k[: -len(".weight")] for k in f.keys() if k.endswith(".weight"))


def llmc_gptq_modules(hessians: Path, out: Path) -> float:
    """llm-compressor's GPTQ core on each captured Linear: min-max group qparams (its default
    weight observer), then ``quantize_weight``. Writes the fake-quantized weights."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from safetensors.torch import load_file, save_file

    data = load_file(str(hessians))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64,
                            actorder="static")
    result, started = {}, time.perf_counter()
    for name in _module_names(hessians):
        w, h = data[f"{name}.weight"], data[f"{name}.hessian"]
        g = w.reshape(w.shape[0], -1, 64)
        scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
        q, _, _ = quantize_weight(w[None].clone(), h[None].clone(), scale[None], zp[None], None, args,
                                  blocksize=128, percdamp=0.01)
        result[name] = q[0].float().contiguous()
    save_file(result, str(out))
    return time.perf_counter() - started


def quantkit_gptq_modules(hessians: Path) -> tuple[dict, dict, float]:
    import torch
    from safetensors.torch import load_file

    from quantkit.quantizers.gptq import GPTQParams, gptq_quantize
    from quantkit.quantizers.rtn import quantize_rtn

    p = GPTQParams(**QUANTKIT["gptq"])
    data = load_file(str(hessians))
    gptq, rtn, started = {}, {}, time.perf_counter()
    for name in _module_names(hessians):
        w, h = data[f"{name}.weight"], data[f"{name}.hessian"]
        gptq[name] = gptq_quantize(w, h, p.scheme(), block_size=p.block_size, dampening_frac=p.dampening_frac,
                                   act_order=p.act_order, static_groups=p.static_groups, name=name).dequantize()
        rtn[name] = quantize_rtn(w, p.scheme()).dequantize()
    return gptq, rtn, time.perf_counter() - started


def output_error(w, w_hat, h) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the calibration output error relative to the output."""
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum() / ((w.double() @ h.double()) * w.double()).sum())


def module_level(args: argparse.Namespace, model_dir: Path, tokens: Path, version: list[str]) -> int:
    from safetensors.torch import load_file

    layers = [int(v) for v in args.layers.split(",")]
    hess = args.work / "hessians.safetensors"
    print("[capture] Hessians of layers", layers, file=sys.stderr, flush=True)
    capture_hessians(model_dir, tokens, layers, hess)
    print("[quantkit] gptq_quantize ...", file=sys.stderr, flush=True)
    qk, rtn, qk_s = quantkit_gptq_modules(hess)
    print(f"[llm-compressor] quantize_weight ... (quantkit took {qk_s:.0f} s)", file=sys.stderr, flush=True)
    llmc_out = args.work / "llmc-gptq-modules.safetensors"
    llmc_s = _run_reference(args.llmc_python, "--phase", "llmc-gptq-modules", "--tokens", str(hess),
                            "--out-dir", str(llmc_out))["seconds"]
    llmc = load_file(str(llmc_out))
    data = load_file(str(hess))
    print(f"GPTQ core, quantkit vs llm-compressor {version[0] if version else '?'}: same weights, same Hessians "
          f"(SmolLM2-135M-Instruct layers {args.layers}, calibration shakespeare {args.calib}), W4 g64 sym, "
          "act-order static, damp 0.01, block 128")
    print()
    print("| Linear | RTN rel. output error | quantkit GPTQ | llm-compressor GPTQ | quantkit / llm-compressor |")
    print("|---|---:|---:|---:|---:|")
    ratios = []
    for name in _module_names(hess):
        w, h = data[f"{name}.weight"], data[f"{name}.hessian"]
        e_rtn, e_qk, e_llmc = (output_error(w, x[name], h) for x in (rtn, qk, llmc))
        ratios.append(e_qk / e_llmc)
        print(f"| {name} | {e_rtn:.4e} | {e_qk:.4e} | {e_llmc:.4e} | {e_qk / e_llmc:.4f} |")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"| geometric mean | | | | {geo:.4f} |")
    print()
    print(f"time for these {len(ratios)} Linears: quantkit {qk_s:.1f} s, llm-compressor {llmc_s:.1f} s")
    return 0


def _reference_phase(args: argparse.Namespace) -> int:
    if args.phase == "llmc-gptq-modules":
        print(json.dumps({"seconds": llmc_gptq_modules(args.tokens, args.out_dir)}))
    elif args.phase == "llmc-quantize":
        seconds = llmc_quantize(args.method, args.model_dir, args.tokens, args.out_dir)
        print(json.dumps({"seconds": seconds}))
    else:
        ppl = {str(c): perplexity(c, args.tokens) for c in args.checkpoints}
        print(json.dumps(ppl))
    return 0


def _run_reference(python: str, *argv: str) -> dict:
    proc = subprocess.run([python, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"reference step {argv[:2]} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llmc-python", default="/work/llmc-venv/bin/python", help="python of llm-compressor's venv")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "quantkit-parity")
    ap.add_argument("--calib", default="32x256", help="calibration samples x tokens")
    ap.add_argument("--eval", default="16x256", help="evaluation windows x tokens")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--seeds", default="0", help="calibration draws, comma-separated; the table adds their mean")
    ap.add_argument("--level", choices=["model", "module"], default="model",
                    help="model: whole-model oneshot and perplexity; module: GPTQ core on chosen layers")
    ap.add_argument("--layers", default="0,15,29", help="decoder layers for --level module")
    ap.add_argument("--phase", choices=["main", "llmc-quantize", "llmc-gptq-modules", "evaluate"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoints", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase != "main":
        return _reference_phase(args)

    sys.path.insert(0, str(ROOT))
    from quantkit.assets import builtin_model_dir

    methods = [m for m in args.methods.split(",") if m]
    calib, evaluation = _pair(args.calib), _pair(args.eval)
    model_dir = builtin_model_dir(MODEL)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(v) for v in args.seeds.split(",")]
    tokens = {seed: args.work / f"tokens-seed{seed}.safetensors" for seed in seeds}
    for seed in seeds:
        dump_tokens(model_dir, calib, evaluation, seed, tokens[seed])
    py = args.llmc_python
    version = subprocess.run([py, "-c", "import llmcompressor, compressed_tensors, transformers, torch; "
                              "print(llmcompressor.__version__, compressed_tensors.__version__, "
                              "transformers.__version__, torch.__version__)"],
                             capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    version = version[0].split() if version else []  # its import logs to stdout: keep the last line
    if args.level == "module":
        return module_level(args, model_dir, tokens[seeds[0]], version)

    times: dict[tuple[str, str, int], float] = {}
    dirs: dict[tuple[str, str, int], Path] = {}
    for seed in seeds:
        for m in methods:
            dirs["quantkit", m, seed] = args.work / f"quantkit-{m}-seed{seed}"
            print(f"[quantkit {m} seed {seed}] ...", file=sys.stderr, flush=True)
            times["quantkit", m, seed] = quantkit_quantize(m, calib, seed, dirs["quantkit", m, seed])
            print(f"[quantkit {m} seed {seed}] {times['quantkit', m, seed]:.0f} s", file=sys.stderr, flush=True)
            dirs["llmc", m, seed] = args.work / f"llmcompressor-{m}-seed{seed}"
            print(f"[llm-compressor {m} seed {seed}] ...", file=sys.stderr, flush=True)
            times["llmc", m, seed] = _run_reference(
                py, "--phase", "llmc-quantize", "--method", m, "--model-dir", str(model_dir), "--tokens",
                str(tokens[seed]), "--out-dir", str(dirs["llmc", m, seed]))["seconds"]
            print(f"[llm-compressor {m} seed {seed}] {times['llmc', m, seed]:.0f} s", file=sys.stderr, flush=True)
    # Evaluation ids do not depend on the seed: score everything on the first tokens file.
    ppl = _run_reference(py, "--phase", "evaluate", "--tokens", str(tokens[seeds[0]]), "--checkpoints",
                         str(model_dir), *[str(d) for d in dirs.values()])

    base = ppl[str(model_dir)]
    print(f"quantkit vs llm-compressor {version[0] if version else '?'} (compressed-tensors "
          f"{version[1] if len(version) > 1 else '?'}, transformers {version[2] if len(version) > 2 else '?'}) on "
          f"{MODEL} (SmolLM2-135M-Instruct), CPU {os.cpu_count()} cores")
    print(f"same calibration ids: shakespeare {calib[0]}x{calib[1]}, seeds {args.seeds}; same evaluation ids: "
          f"shakespeare-eval {evaluation[0]}x{evaluation[1]}; perplexity of each checkpoint loaded by transformers, "
          "one code path")
    print()
    print("| method | calibration seed | quantkit ppl | llm-compressor ppl | base ppl | quantkit time (s) "
          "| llm-compressor time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m in methods:
        rows = [(ppl[str(dirs["quantkit", m, s])], ppl[str(dirs["llmc", m, s])], times["quantkit", m, s],
                 times["llmc", m, s]) for s in seeds]
        for seed, (qk, lc, tq, tl) in zip(seeds, rows):
            print(f"| {LABELS[m]} | {seed} | {qk:.3f} | {lc:.3f} | {base:.3f} | {tq:.0f} | {tl:.0f} |")
        if len(seeds) > 1:
            mean = [sum(col) / len(col) for col in zip(*rows)]
            print(f"| {LABELS[m]} | mean of {len(seeds)} | **{mean[0]:.3f}** | **{mean[1]:.3f}** | {base:.3f} "
                  f"| {mean[2]:.0f} | {mean[3]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
