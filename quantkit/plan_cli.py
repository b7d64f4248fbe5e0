"""``quantkit plan``: the subcommand and the table it prints.

The main CLI calls ``add_plan_command(subparsers)``; the parsed ``args.func(args)`` runs the
plan and returns the exit status. ``main(argv)`` does both, for tests and scripts.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .gpus import GPUS, GiB

if TYPE_CHECKING:
    from .planner import PlanResult


def add_plan_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan`` to a subparsers object; its ``func`` default is ``run_plan``."""
    p = subparsers.add_parser(
        "plan",
        help="memory plan and vllm serve command for a model on a GPU (reads config.json only)",
        description="Weights, KV cache, activations per precision; the longest context that fits; "
        "a recommended scheme and its vllm serve command. Figures are per GPU.",
    )
    p.add_argument("model", help="local model folder, config.json file, or hub id")
    p.add_argument("--gpu", default="H100-80GB", help=f"{', '.join(GPUS)}, or a size like 24GB (default H100-80GB)")
    p.add_argument("--gpus", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--context", type=int, default=None, help="max_model_len you need (default: longest that fits)")
    p.add_argument("--batch", type=int, default=1, help="sequences of that length held at once (default 1)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--group-size", type=int, default=None, help="W4A16 group size (default 128)")
    p.add_argument("--revision", default=None, help="hub revision of the config")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``quantkit plan``: prints the table (or JSON) and returns 0.

    ``QuantkitError`` propagates: the main CLI prints it in one line.
    """
    from .planner import plan_model

    result = plan_model(
        args.model,
        gpu=args.gpu,
        gpus=args.gpus,
        context=args.context,
        batch=args.batch,
        kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        group_size=args.group_size,
        revision=args.revision,
    )
    print(result.to_json() if args.json else format_plan_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quantkit plan ARGS`` on its own: ``main(["plan", "path/to/model", "--gpu", "L40S"])``."""
    parser = argparse.ArgumentParser(prog="quantkit")
    add_plan_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan_table(result: "PlanResult") -> str:
    """The plan as a fixed-width table, one row per precision, then notes and the command."""
    r = result
    lines = [
        f"{r.model}: {r.architecture}, {r.parameters / 1e9:.2f} B parameters, max context {r.max_position_embeddings}",
        f"{r.gpus} x {r.gpu} ({_gib(r.gpu_memory_bytes)} GiB visible to CUDA), gpu_memory_utilization "
        f"{r.gpu_memory_utilization:g}, batch {r.batch}, context {r.context or 'longest'}, KV cache {r.kv_cache_dtype}",
        f"activation allowance assumes vLLM defaults max_num_batched_tokens={r.max_num_batched_tokens}, "
        f"max_num_seqs={r.max_num_seqs}; GiB per GPU",
        "",
    ]
    header = ("scheme", "weights", "emb/head/norm", "KV/token", "activ.", "KV budget", "total", "max len", "fits")
    rows = [header]
    for s in r.rows:
        name = s.label + ("" if s.native else " *")
        rows.append((
            name,
            _gib(s.weight_bytes),
            _gib(s.unquantized_bytes),
            f"{s.kv_bytes_per_token / 1024:.0f} KiB",
            _gib(s.activation_bytes),
            _gib(max(s.kv_budget_bytes, 0)),
            _gib(s.total_bytes),
            str(s.max_model_len),
            ("yes" if s.fits else "no") + (" <-" if s.scheme == r.recommended else ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    if any(not s.native for s in r.rows):
        lines.append("* no tensor cores for this scheme's activations on this GPU")
    lines.append("")
    lines.append(f"recommended: {r.recommended or 'none'}")
    if r.experts:
        lines.append(f"Mixture-of-Experts: {r.experts} experts in {r.moe_layers} of the layers (weights above count "
                     "every expert: vLLM holds them all)")
    m = r.quantize_memory
    if m is not None:
        lines.append(f"quantize (GPTQ, 128 x 2048 calibration tokens): ~{_gib(m.total)} GiB on one device for its "
                     f"largest layer: weights {_gib(m.layer)} + codes {_gib(m.codes)} + Hessians {_gib(m.hessians)} + "
                     f"solve {_gib(m.solve)} + activations {_gib(m.activations)}"
                     + (f" (one Hessian per expert Linear would take {_gib(m.per_expert_hessians)} instead of "
                        f"{_gib(m.hessians)})" if r.experts else ""))
    lines += [f"note: {n}" for n in r.notes]
    if r.serve_command:
        lines.append(r.serve_command)
    return "\n".join(lines)
