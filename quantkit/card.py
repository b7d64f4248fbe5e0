"""The model card (README.md) written beside every checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml


def base_license(model_dir: Path) -> str | None:
    """The license in the base model's card metadata, so the quantized card keeps it."""
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    m = re.match(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def render_card(report: dict[str, Any], license_: str | None) -> str:
    method, fmt = report["method"], report["format"]
    meta: dict[str, Any] = {
        "base_model": report["model"],
        "base_model_relation": "quantized",
        "library_name": "transformers",
        "tags": ["quantkit", "quantized", method, fmt, report["scheme_name"].lower()],
    }
    if license_:
        meta["license"] = license_
    ev = report.get("evaluation") or {}
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {Path(report['output_dir']).name}", "",
        f"`{report['model']}` quantized with quantkit using **{method}** "
        f"({report['scheme_name']}), stored in the **{fmt}** format that vLLM loads directly.", "",
        "## Serve", "", "```bash", report["serve_command"], "```", "",
    ]
    if report.get("load_decompressed"):
        lines += [
            "## Load with transformers", "", "```python",
            "from transformers import AutoModelForCausalLM, CompressedTensorsConfig",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({json.dumps(report['output_dir'])},",
            "                                             quantization_config=CompressedTensorsConfig(dequantize=True))",
            "```", "",
            "Decompressed as it loads (`run_compressed=False` on transformers releases before that name): "
            "transformers 5 with compressed-tensors 0.20 cannot load asymmetric weights compressed, nor run "
            "compressed FP4 weights in float32.", "",
        ]
    lines += ["## Evaluation", ""]
    if ev.get("perplexity_base") is not None:
        lines += [
            f"Perplexity on {ev['num_windows']} windows of {ev['seq_len']} tokens of `{ev['source']}`:", "",
            "| model | perplexity | size on disk |", "|---|---|---|",
            f"| base | {ev['perplexity_base']:.3f} | {report['size_bytes']['base'] / 1e9:.3f} GB |",
            f"| quantized | {ev['perplexity_quantized']:.3f} | {report['size_bytes']['quantized'] / 1e9:.3f} GB |",
            "",
        ]
        if ev.get("kl_mean") is not None:
            lines += [
                f"Next-token distribution of the quantized model against the base model over the same "
                f"{ev['positions']} positions: KL divergence mean {ev['kl_mean']:.4f} nats, p99 {ev['kl_p99']:.4f} "
                f"nats; the most likely token agrees at {100 * ev['top1_agreement']:.2f}% of positions.", "",
            ]
    else:
        lines += ["Not evaluated (evaluate.enabled: false).", ""]
    lines += _tuning_lines(report.get("tuning"))
    kept = report.get("unquantized") or []
    if kept:
        lines += ["## What stayed unquantized", "",
                  "Copied from the base model in its own precision (every other tensor of the base "
                  "checkpoint is in this one too):", ""]
        lines += [f"- `{k['module']}`: {k['reason']}" for k in kept]
        lines += [""]
    lines += _task_lines(report.get("tasks"))
    lines += _experts_section(report.get("experts"))
    cal = report["calibration"]
    lines += [
        "## How it was made", "",
        f"- calibration: `{cal['source']}`, {cal['num_samples']} sequences × {cal['max_seq_length']} tokens "
        f"(packing {cal['packing']}, seed {cal['seed']})",
        f"- quantization parameters: `{report['quantization']}`",
        # No timings here: they vary from run to run, and the card is otherwise the same (report.json has them).
        f"- device: {report['device']}",
        "",
    ]
    return "\n".join(lines)


def _task_lines(tasks: dict[str, Any] | None) -> list[str]:
    """The lm-eval table written by ``quantkit eval --tasks``: each metric of base and
    quantized, with standard errors, and the recovery ratio."""
    if not tasks:
        return []
    shots = "" if tasks.get("num_fewshot") is None else f", {tasks['num_fewshot']}-shot"
    limit = "" if tasks.get("limit") is None else f", first {tasks['limit']} documents per task"
    lines = [f"### Task accuracy (lm-evaluation-harness {tasks['lm_eval_version']}, {tasks['backend']} backend"
             f"{shots}{limit})", "",
             "| task | metric | base | quantized | recovery |", "|---|---|---|---|---|"]
    for task, metrics in tasks["tasks"].items():
        for metric, m in metrics.items():
            rec = "-" if m["recovery"] is None else f"{100 * m['recovery']:.1f}%"
            lines.append(f"| {task} | {metric} | {_with_stderr(m['base'], m['base_stderr'])} | "
                         f"{_with_stderr(m['quantized'], m['quantized_stderr'])} | {rec} |")
    if tasks.get("mean_recovery") is not None:
        lines += ["", f"Mean recovery (first metric of each task): {100 * tasks['mean_recovery']:.1f}%."]
    return lines + [""]


def _with_stderr(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def _experts_section(experts: dict[str, Any] | None) -> list[str]:
    """Calibration tokens per expert: the routed counts (fewest, median, most) per MoE block,
    how many tokens the statistics saw, and the experts that fell back to round-to-nearest."""
    if not experts:
        return []
    mode = ("every calibration token went through every expert for statistics; only routed outputs propagated"
            if experts["all_experts"] else "each expert's statistics saw only the tokens routed to it")
    lines = ["## Experts", "", f"Calibration: {mode}. Tokens the router sent to each expert:", "",
             "| experts | experts | fewest routed | median | most | statistics from (fewest) |", "|---|---|---|---|---|---|"]
    for name, per in experts["routed_tokens"].items():
        s = sorted(per)
        stats = min(experts["statistics_tokens"][name])
        lines.append(f"| `{name}` | {len(per)} | {s[0]} | {s[len(s) // 2]} | {s[-1]} | {stats} |")
    lines.append("")
    if experts["rtn_fallback"]:
        lines += [f"Below {experts['min_expert_tokens']} tokens an expert is quantized by round-to-nearest: "
                  + ", ".join(f"`{n}`" for n in experts["rtn_fallback"]), ""]
    return lines


def _tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    """What ``quantkit tune`` changed after the run, and what it measured."""
    if not tuning:
        return []
    # A report without kl_windows predates scoring the KL on a subset: it was scored on all windows.
    scored = tuning.get("kl_windows", tuning["windows"])
    lines = [
        f"The group scales and norm weights were then tuned end to end against `{tuning['base']}` "
        f"(`quantkit tune`, {tuning['steps']} steps on {tuning['windows']} windows of {tuning['seq_len']} tokens): "
        f"next-token KL on {scored} of those windows {tuning['kl_before']:.4f} -> {tuning['kl_after']:.4f} nats.", "",
    ]
    if "perplexity_tuned" in tuning:
        # A report without base_dtype predates holding the base in bf16 on a GPU: it was float32.
        lines += [f"Perplexity on the evaluation windows above (base in {tuning.get('base_dtype', 'float32')}, "
                  f"the others in float32): base {tuning['perplexity_base']:.3f}, "
                  f"quantized {tuning['perplexity_before']:.3f}, tuned {tuning['perplexity_tuned']:.3f}.", ""]
    return lines
