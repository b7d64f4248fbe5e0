"""``quantkit plan``: the subcommand (the table it prints is ``planner.result.format_plan_table``).

The main CLI calls ``add_plan_command(subparsers)``; the parsed ``args.func(args)`` runs the
plan and returns the exit status. ``main(argv)`` does both, for tests and scripts.
"""

from __future__ import annotations

import argparse

from .gpus import GPUS
from .planner import format_plan_table, plan_model


def add_plan_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan`` to a subparsers object; its ``func`` default is ``run_plan``."""
    p = subparsers.add_parser(
        "plan",
        help="memory plan and vllm serve command for a model on a GPU (reads config.json only)",
        description="Weights, KV cache, activations per precision; the longest context that fits; "
        "a recommended scheme and its vllm serve command. Figures are per GPU.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="local model folder, config.json file, or hub id (default: the recipe's model)")
    p.add_argument("--gpu", default="H100-80GB", help=f"{', '.join(GPUS)}, or a size like 24GB (default H100-80GB)")
    p.add_argument("--gpus", type=int, default=1,
                   help="tensor-parallel size (default 1); the quantize line is per device of quantkit run --gpus N")
    p.add_argument("--context", type=int, default=None, help="max_model_len you need (default: longest that fits)")
    p.add_argument("--batch", type=int, default=1, help="sequences of that length held at once (default 1)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--group-size", type=int, default=None, help="W4A16 group size (default 128)")
    p.add_argument("--revision", default=None, help="hub revision of the config")
    p.add_argument("--recipe", default=None,
                   help="recipe file or shipped recipe name: the quantize line counts its quantizer and calibration "
                   "size (default: the shipped 4-bit recipes' GPTQ with input_feedback at 128 x 2048 tokens)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``quantkit plan``: prints the table (or JSON) and returns 0.

    ``QuantkitError`` propagates: the main CLI prints it in one line.
    """
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
        recipe=args.recipe,
    )
    print(result.to_json() if args.json else format_plan_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quantkit plan ARGS`` on its own: ``main(["plan", "path/to/model", "--gpu", "L40S"])``."""
    parser = argparse.ArgumentParser(prog="quantkit")
    add_plan_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
