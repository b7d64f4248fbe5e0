"""``quantkit tune``: what the subcommand does (its options are in ``cli.build_parser``; the
tuning itself is ``scale_tuning.tune_checkpoint``).

It works on a folder ``run`` wrote, so by default it reads the base model and the calibration
windows from that run's report.json: the same windows the quantizer saw, and the evaluation
windows the run scored, so the tuned perplexity sits beside the run's own numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import QuantkitError


def run_tune(args: argparse.Namespace) -> int:
    from .calibration import TextRequest, load_tokens
    from .model import ModelSource, load_tokenizer, read_config
    from .output_report import add_section, read_report
    from .preflight import resolve_device
    from .scale_tuning import TuneSettings, packed_bits, tune_checkpoint

    folder = Path(args.checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise QuantkitError(f"{folder}: not a checkpoint folder (no config.json)", field="checkpoint",
                            file=folder / "config.json", hint="give the output folder of `quantkit run`")
    packed_bits(read_config(folder / "config.json", quantized_ok=True), args.checkpoint, folder)
    if not args.lr > 0:
        raise QuantkitError(f"--lr must be positive, got {args.lr}", field="--lr", value=args.lr)
    report = read_report(folder) or {}
    base = args.base or report.get("model")
    if base is None:
        raise QuantkitError(f"{folder} has no report.json naming its base model", field="--base",
                            hint="pass --base MODEL (folder, hub id or builtin:smollm2-135m)")
    cal: dict[str, Any] = report.get("calibration") or {}
    source = args.source or cal.get("source")
    num, seq = args.num_samples or cal.get("num_samples"), args.max_seq_length or cal.get("max_seq_length")
    for value, flag in ((source, "--source"), (num, "--num-samples"), (seq, "--max-seq-length")):
        if value is None:
            raise QuantkitError(f"{folder}: its report.json records no calibration {flag[2:]}", field=flag,
                                hint=f"pass {flag}")
    if source == "self":
        raise QuantkitError(f"{folder}: the run calibrated on text the model generated, which tune does not "
                            "regenerate", field="--source", value=source, hint="pass --source with a text source")
    device = resolve_device(args.device, field="--device")
    model_dir = ModelSource.open(base).path
    tokenizer = load_tokenizer(model_dir)
    calibration = load_tokens(TextRequest(source, num, seq, cal.get("packing", True), cal.get("seed", 0), True),
                              tokenizer, model_dir)
    ev = report.get("evaluation") or {}
    evaluation = load_tokens(TextRequest(ev["source"], ev["num_windows"], ev["seq_len"], True, 0, False,
                                         section="evaluate"), tokenizer, model_dir) if ev.get("source") else None
    settings = TuneSettings(args.steps, args.lr, args.batch_size, args.seed)
    result = tune_checkpoint(folder, base, calibration, settings, device, evaluation, name=args.checkpoint,
                             quiet=args.quiet)
    print(f"KL from base on the calibration windows: {result['kl_before']:.4f} -> {result['kl_after']:.4f} nats "
          f"({result['steps']} steps, {result['seconds']:.0f} s)")
    if "perplexity_tuned" in result:
        print(f"perplexity (float32): base {result['perplexity_base']:.3f}, quantized "
              f"{result['perplexity_before']:.3f} -> tuned {result['perplexity_tuned']:.3f} on "
              f"{result['eval_windows']} windows of {ev['source']}")
    if report:
        add_section(folder, "tuning", result)
    print(f"rewrote {folder}'s scales and norm weights" + (", report.json and README.md" if report else ""))
    return 0
