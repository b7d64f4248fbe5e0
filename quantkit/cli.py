"""The command line: ``python -m quantkit run|validate|eval|plan|push``.

A ``QuantkitError`` is printed as one line and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import DistributedError, PeerLostError, QuantkitError
from .launch import LAUNCHED_ENV, PEER_LOST_EXIT

log = logging.getLogger("quantkit")


def _run(args: argparse.Namespace) -> int:
    from . import pipeline
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        import torch

        from .checkpoint import work_dir_for
        from .launch import run_ranks

        if recipe.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
            raise DistributedError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs are visible",
                                   field="--gpus", value=args.gpus, hint="ask for at most as many ranks as GPUs")
        output = Path(args.output_dir) if args.output_dir else recipe.export.output_dir
        flags = ["--quiet"] * args.quiet + ["--debug"] * bool(getattr(args, "debug", False))
        return run_ranks(args.gpus, flags + ["run", args.recipe] + ["--output-dir", str(output)] +
                         ["--overwrite"] * args.overwrite + ["--resume"] * args.resume, str(work_dir_for(output)))
    if args.output_dir:
        recipe.export.output_dir = Path(args.output_dir)
    if args.overwrite:
        recipe.export.overwrite = True
    report = pipeline.run(recipe, quiet=args.quiet, resume=args.resume)
    if not report:  # a rank other than 0: rank 0 reports
        return 0
    ev = report.get("evaluation")
    if ev:
        print(f"perplexity: base {ev['perplexity_base']:.3f} -> quantized {ev['perplexity_quantized']:.3f} "
              f"({ev['num_windows']} windows x {ev['seq_len']} tokens of {ev['source']})")
    size = report["size_bytes"]
    print(f"size: {size['base'] / 1e6:.1f} MB -> {size['quantized'] / 1e6:.1f} MB; "
          f"time {report['timing']['total_seconds']:.1f} s")
    print(f"wrote {report['output_dir']}\nserve: {report['serve_command']}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: valid ({recipe.quantization.method} -> {recipe.format_name})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, source=args.source, num_samples=args.num_samples,
                                 max_seq_length=args.max_seq_length)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.checkpoint}: perplexity {result['perplexity']:.3f} on {result['num_windows']} windows "
          f"x {result['seq_len']} tokens of {result['source']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .recipe import recipe_fields_help

    parser = argparse.ArgumentParser(
        prog="quantkit",
        description="Quantize Hugging Face causal LMs layer by layer into checkpoints vLLM serves.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="quantize as a recipe says, evaluate, export (and push)",
                         description="Quantize as RECIPE says. Recipe fields:\n\n" + recipe_fields_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", help="recipe YAML file (see recipes/)")
    run.add_argument("--output-dir", help="override export.output_dir")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--resume", action="store_true",
                     help="continue a killed run from its last finished layer (same recipe)")
    run.add_argument("--gpus", type=int, default=1, metavar="N",
                     help="quantize on N GPUs of this host (starts N ranks with torchrun's launcher; "
                          "without CUDA, N CPU ranks with gloo); or start quantkit under torchrun yourself")
    run.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    run.set_defaults(func=_run)

    val = sub.add_parser("validate", help="check a recipe without reading any weight")
    val.add_argument("recipe", help="recipe YAML file")
    val.set_defaults(func=_validate)

    ev = sub.add_parser("eval", help="perplexity of a model or quantized checkpoint folder")
    ev.add_argument("checkpoint", help="folder written by `run`, a model folder, or builtin:smollm2-135m")
    ev.add_argument("--source", default="shakespeare-eval", help="text source (as calibration.source)")
    ev.add_argument("--num-samples", type=int, default=16, help="number of windows")
    ev.add_argument("--max-seq-length", type=int, default=512, help="tokens per window")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_eval)

    from .hub_cli import add_push_command
    from .plan_cli import add_plan_command

    add_plan_command(sub)
    add_push_command(sub)
    return parser


def one_line(message: str) -> str:
    """A message as one line: a wrapped or multi-line one (e.g. quoting a library) is joined."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun, ranks other than 0 keep to warnings: rank 0 tells the story.
    quiet = args.quiet or int(os.environ.get("RANK", "0")) > 0
    level = logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        for noisy in ("transformers", "datasets", "httpx", "httpx2", "huggingface_hub", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except PeerLostError as e:
        if args.debug:
            raise
        if os.environ.get(LAUNCHED_ENV):  # the launcher names the rank that failed
            return PEER_LOST_EXIT
        print(f"error: rank {os.environ.get('RANK', 0)}: {one_line(str(e))}", file=sys.stderr)
        return 2
    except QuantkitError as e:
        if args.debug:
            raise
        rank = f"rank {os.environ['RANK']}: " if "WORLD_SIZE" in os.environ else ""
        print(f"error: {rank}{one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # only a run imports it; validate and plan stay light
            from .distributed import close

            close()
