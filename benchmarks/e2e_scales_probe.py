"""A probe, not a method: after the shipped 4-bit row, does tuning its group scales (and norm
weights) end to end against the float model's next-token distribution bring it to half of the
best peer's perplexity increase (issue 20)?

    python benchmarks/e2e_scales_probe.py --device cuda --seeds 0,1 --calib 256x256 --eval 32x256 \
        --configs scales:1e-3:128 scales,norms:3e-3:16:8 [--batch 8] [--row gptq-asym-rot] [--out DIR]

Every layer-wise lever measured on the shipped row (``gptq-asym-rot-clip-fb-seq``) stayed inside
the draws' noise, and the row's error was found to compound from layer to layer (docs/quality.md,
stop 37). This is the one kind of lever left that sees the whole model: EfficientQAT's E2E-QP.
The integer codes and zero points stay exactly as GPTQ chose them, so the result exports in the
same format; only each group's scale (as ``s₀·exp(θ)``) and, with ``norms``, each RMSNorm's
weight move. They move by Adam (cosine-decayed learning rate) on KL(float ‖ quantized) over the
calibration windows, the float model being the original (the rotation leaves its function
unchanged).

Per draw: ``quality.run_one`` quantizes and exports the shipped row (or ``--row``, another of
``quality.py``'s GPTQ rows: is the shipped row's cost still worth it once tuned?); its codes,
zero points and scales are read back from the checkpoint and tuned by ``quantkit.scale_tuning`` (what ``quantkit
tune`` runs; before that module existed this probe held the same code, and the two gave the same
perplexity to 14 digits on the CPU); base, start and tuned perplexity are scored in float32
on ``quality.py``'s evaluation ids by ``llmcompressor_parity.model_perplexity`` (the peers'
scoring), the tuned scales rounded to the checkpoint's dtype first, as an export would store them;
and the same on the shipped Shakespeare tragedies (``shakespeare-eval``), out of the calibration's
domain.
Prints one table; each draw is a JSON line in ``--out``/e2e.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402
from llmcompressor_parity import model_perplexity  # noqa: E402

from quantkit.scale_tuning import (  # noqa: E402
    load_student, load_teacher, norm_weights, read_packed, tune)
from quantkit.tune_memory import products_dtype, teacher_dtype  # noqa: E402
from quantkit.tune_settings import TuneSettings  # noqa: E402

SHIPPED, BITS = "gptq-asym-rot-clip-fb-seq", 4


def probe(key: str, model: str, seed: int, calib: tuple[int, int], evaluation: tuple[int, int], work: Path,
          device: str, configs: list[tuple[set[str], float, int, int | None]], batch: int,
          base_dtype: torch.dtype | None = None) -> list[dict]:
    """One draw: the 4-bit row ``key`` of ``quality.ROWS`` quantized once, then each ``(train, lr,
    steps, batch)`` tuned from it (``batch`` None: the ``batch`` given here)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from quantkit.calibration import TextRequest, load_tokens
    from quantkit.model import ModelSource, read_config
    from quantkit.preflight import resolve_dtype

    saved = work / "results" / f"pydoc-{key}-{seed}-{calib[0]}x{calib[1]}-{evaluation[0]}x{evaluation[1]}-{device}.json"
    if saved.exists():  # the row quality.py already ran into this --out
        row = json.loads(saved.read_text())
    else:
        row = quality.run_one(key, "pydoc", seed, calib, evaluation, work, device, model)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(row))
    model_dir = ModelSource.open(model).path
    tokens = load_file(str(quality.dump_tokens("pydoc", seed, calib, evaluation, work, model_dir)))
    cal, ev = tokens["calibration"].to(device), tokens["evaluation"].to(device)
    # Out of the calibration's domain: the shipped Shakespeare tragedies, as quality.py's other domain
    tok = AutoTokenizer.from_pretrained(model_dir)
    other = torch.stack(load_tokens(TextRequest("shakespeare-eval", evaluation[0], evaluation[1], True, 0, False,
                                                section="evaluate"), tok, model_dir)).to(device)
    checkpoint = work / "checkpoints" / f"pydoc-{key}-{seed}"
    linears, _ = read_packed(checkpoint, BITS, torch.device(device))

    teacher = load_teacher(model_dir, torch.device(device), torch.float32)
    # The target the steps see (tune's own choice unless told); perplexities are scored with the
    # float32 base either way.
    stored = resolve_dtype("auto", read_config(model_dir / "config.json"))
    dtype = base_dtype or teacher_dtype(torch.device(device), stored)
    target = teacher if dtype == torch.float32 else load_teacher(model_dir, torch.device(device), dtype)
    base, other_base = model_perplexity(teacher, ev), model_perplexity(teacher, other)
    results = []
    for train, lr, steps, config_batch in configs:
        windows = config_batch or batch
        student, scaled = load_student(checkpoint, linears, torch.device(device), str(checkpoint))
        params = [p.theta for p in scaled.values()] if "scales" in train else []
        if "norms" in train:
            for w in norm_weights(student).values():
                w.requires_grad_(True)
                params.append(w)
        start, other_start = model_perplexity(student, ev), model_perplexity(student, other)
        began = time.perf_counter()
        losses = tune(student, target, cal, params, TuneSettings(steps, lr, windows, seed))
        seconds = time.perf_counter() - began
        tuned, other_tuned = model_perplexity(student, ev), model_perplexity(student, other)
        results.append({"row": key, "seed": seed, "calib": list(calib), "eval": list(evaluation), "steps": steps,
                        "lr": lr, "batch": windows, "train": sorted(train), "ppl_base": base, "ppl_start": start,
                        "ppl_tuned": tuned, "shakespeare_base": other_base, "shakespeare_start": other_start,
                        "shakespeare_tuned": other_tuned, "engine_base": row["ppl_base"], "engine_ppl": row["ppl"],
                        "gptq_s": row["quantize_s"], "tune_s": seconds, "loss_first": sum(losses[:4]) / 4,
                        "loss_last": sum(losses[-4:]) / 4, "device": device,
                        "teacher_dtype": str(dtype).removeprefix("torch."),
                        "matmul": "tf32" if device == "cuda" else "float32",  # tune's tensor_core_matmuls
                        "products": str(products_dtype(torch.device(device))).removeprefix("torch."),
                        "attention": student.config._attn_implementation})
        del student, scaled, params
    return results


def parse_config(text: str) -> tuple[set[str], float, int, int | None]:
    """``scales,norms:1e-3:128[:8]`` → what is trained, Adam's learning rate, steps, and windows a
    step (None: ``--batch``)."""
    train, lr, steps, *batch = text.split(":")
    parts = set(train.split(","))
    if not parts <= {"scales", "norms"} or len(batch) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: TRAIN:LR:STEPS[:BATCH], TRAIN scales and/or norms")
    return parts, float(lr), int(steps), int(batch[0]) if batch else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=quality.MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--calib", default="32x256")
    ap.add_argument("--eval", default="16x256")
    ap.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config("scales:1e-3:64")],
                    help="each TRAIN:LR:STEPS[:BATCH], TRAIN being scales, norms or scales,norms")
    ap.add_argument("--row", default=SHIPPED, choices=[k for k in quality.ROWS if k.startswith("gptq")],
                    help="the 4-bit row tuned (quality.py's key; default: the shipped one)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--teacher-dtype", choices=("float32", "bfloat16"),
                    help="the base model the steps distil from (default: tune's choice, bf16 on a GPU; "
                         "perplexities are scored in float32 either way)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "e2e")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"Row: {args.row}")
    print("| draw | tuned | lr | steps | batch | base | row | tuned | Δ row | Δ tuned | KL first → last | tune s "
          "| Shakespeare: Δ row | Δ tuned |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    teacher = args.teacher_dtype and getattr(torch, args.teacher_dtype)
    for seed in (int(s) for s in args.seeds.split(",")):
        for r in probe(args.row, args.model, seed, quality._pair(args.calib), quality._pair(args.eval), args.out,
                       args.device, args.configs, args.batch, teacher):
            with open(args.out / "e2e.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            d0, d1 = (100 * (r[k] / r["ppl_base"] - 1) for k in ("ppl_start", "ppl_tuned"))
            print(f"| {seed} | {'+'.join(r['train'])} | {r['lr']:g} | {r['steps']} | {r['batch']} | {r['ppl_base']:.3f} | "
                  f"{r['ppl_start']:.3f} | {r['ppl_tuned']:.3f} | {d0:+.2f}% | {d1:+.2f}% | "
                  f"{r['loss_first']:.4f} → {r['loss_last']:.4f} | {r['tune_s']:.0f} | "
                  f"{100 * (r['shakespeare_start'] / r['shakespeare_base'] - 1):+.2f}% | "
                  f"{100 * (r['shakespeare_tuned'] / r['shakespeare_base'] - 1):+.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
