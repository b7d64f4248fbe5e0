"""What ``quantkit bench`` writes: bench.json (everything measured), bench.md (tables and the
answers side by side) and PNG plots of quality against size and against serving speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUALITY_AXES = {
    "perplexity": "perplexity (lower is better)",
    "task_accuracy": "mean task accuracy (higher is better)",
}


def throughput_at_top(serving: dict[str, Any]) -> float | None:
    """Output tokens/s at the highest concurrency measured, averaged over prompt kinds."""
    levels = serving.get("levels") or []
    if not levels:
        return None
    top = max(level["concurrency"] for level in levels)
    rates = [level["output_tokens_per_second"] for level in levels if level["concurrency"] == top]
    return sum(rates) / len(rates)


def write_report(data: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "bench.json").write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    plots = write_plots(data, out_dir)
    (out_dir / "bench.md").write_text(markdown(data, plots), encoding="utf-8")


def write_plots(data: dict[str, Any], out_dir: Path) -> list[str]:
    """quality_vs_size.png and quality_vs_speed.png (one panel per quality measure the reports
    carry) and throughput.png (tokens/s against concurrency); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = data["models"]
    axes = [k for k in QUALITY_AXES if any(m["quality"].get(k) is not None for m in models)]
    written = []
    unit, scale = ("GB", 1e9) if max((m["size_bytes"] or 0) for m in models) >= 1e9 else ("MB", 1e6)
    xs = {"size": (f"size on disk ({unit})", lambda m: None if m["size_bytes"] is None else m["size_bytes"] / scale),
          "speed": (f"output tokens/s at concurrency {max(data['settings']['concurrencies'])}",
                    lambda m: throughput_at_top(m["serving"]))}
    for name, (xlabel, x_of) in xs.items():
        if not axes:
            break
        fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
        for panel, key in zip(panels[0], axes):
            for m in models:
                x, y = x_of(m), m["quality"].get(key)
                if x is None or y is None:
                    continue
                panel.scatter([x], [y], marker="o" if m["role"] == "base" else "s", s=50)
                panel.annotate(m["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            panel.set_xlabel(xlabel)
            panel.set_ylabel(QUALITY_AXES[key])
            panel.grid(alpha=0.3)
        fig.suptitle(f"quality against {name}")
        fig.tight_layout()
        fig.savefig(out_dir / f"quality_vs_{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"quality_vs_{name}.png")
    fig, panel = plt.subplots(figsize=(6, 4.2))
    for m in models:
        levels = m["serving"].get("levels") or []
        by_c: dict[int, list[float]] = {}
        for level in levels:
            by_c.setdefault(level["concurrency"], []).append(level["output_tokens_per_second"])
        if by_c:
            cs = sorted(by_c)
            panel.plot(cs, [sum(by_c[c]) / len(by_c[c]) for c in cs], marker="o", label=m["name"])
    panel.set_xlabel("concurrent requests")
    panel.set_ylabel("output tokens/s (mean over prompt kinds)")
    panel.set_xscale("log", base=2)
    panel.grid(alpha=0.3)
    panel.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    plt.close(fig)
    return written + ["throughput.png"]


def _num(v: float | None, fmt: str, unit: str = "") -> str:
    return "-" if v is None else format(v, fmt) + unit


def _gb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1e9:.3f} GB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def markdown(data: dict[str, Any], plots: list[str]) -> str:
    s = data["settings"]
    models = data["models"]
    served = next((m["serving"] for m in models if m["serving"].get("vllm_version")), {})
    lines = [
        "# Serving benchmark (quantkit bench)", "",
        f"vLLM {served.get('vllm_version', '?')} on {s['device']}, dtype {s['dtype']}, max_model_len "
        f"{s['max_model_len']}; greedy; {s['max_tokens']} output tokens per timed request (end-of-sequence "
        f"ignored, so every model does the same work); concurrencies {', '.join(map(str, s['concurrencies']))}; "
        f"{s['prompts_per_kind']} prompts per kind, cycled to at least twice the concurrency.", "",
        "## Models", "",
        "| model | size on disk | perplexity | KL mean (nats) | top-1 agreement | task accuracy | vLLM load | "
        "peak RSS | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        q, v = m["quality"], m["serving"]
        status = "ok" if v.get("loads") and not v.get("error") else f"failed: {v.get('error', '')}".replace("|", "/")
        lines.append(
            f"| {m['name']} | {_gb(m['size_bytes'])} | "
            f"{_num(q.get('perplexity'), '.3f')} | {_num(q.get('kl_mean'), '.4f')} | "
            f"{_num(None if q.get('top1_agreement') is None else 100 * q['top1_agreement'], '.1f', '%')} | "
            f"{_num(q.get('task_accuracy'), '.4f')} | "
            f"{_num(v.get('load_seconds'), '.0f', ' s')} | {_gb(v.get('peak_rss_bytes'))} | "
            f"{status} |")
    lines += ["", "## Speed", "",
              "Throughput is output tokens/s over the level's wall time; TTFT is from submitting a request to "
              "its first token; per-token latency is (last token - first token) / (tokens - 1).", "",
              "| model | prompt kind | concurrency | output tok/s | requests/s | TTFT p50 / p90 (ms) | "
              "per-token p50 / p90 (ms) |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        for level in m["serving"].get("levels") or []:
            lines.append(
                f"| {m['name']} | {level['kind']} | {level['concurrency']} | "
                f"{_num(level['output_tokens_per_second'], '.1f')} | {_num(level['requests_per_second'], '.2f')} | "
                f"{_ms(level['ttft_p50'])} / {_ms(level['ttft_p90'])} | "
                f"{_ms(level['per_token_p50'])} / {_ms(level['per_token_p90'])} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Answers", "", f"Greedy, up to {s['max_tokens']} tokens, stopping at end-of-sequence.", ""]
    answered = [m for m in models if m["serving"].get("answers")]
    for kind, prompts in s["prompts"].items():
        lines += [f"### {kind}", ""]
        for i, prompt in enumerate(prompts):
            lines += [f"**Prompt:** {prompt}", ""]
            for m in answered:
                answer = m["serving"]["answers"][kind][i]["answer"].strip()
                fence = "````" if "```" in answer else "```"  # code answers carry their own fences
                lines += [f"*{m['name']}*:", "", fence + "text", answer or "(empty)", fence, ""]
    return "\n".join(lines)
