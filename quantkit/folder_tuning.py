"""A run's output folder tuned (``quantkit tune``, ``quantkit.tune``): the tuning itself is
``scale_tuning.tune_checkpoint``; this fills in what the user did not say.

It works on a folder ``run`` wrote, so by default it reads the base model and the calibration
windows from that run's report.json: the same windows the quantizer saw, and the evaluation
windows the run scored, so the tuned perplexity sits beside the run's own numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import QuantkitError
from .scale_tuning import packed_bits, tune_checkpoint
from .tune_settings import TuneSettings


def tune_folder(folder: str | Path, *, base: str | None = None, source: str | None = None,
                num_samples: int | None = None, max_seq_length: int | None = None,
                steps: int = TuneSettings.steps, lr: float = TuneSettings.lr,
                batch_size: int = TuneSettings.batch_size, seed: int = TuneSettings.seed, device: str = "auto",
                quiet: bool = False) -> dict[str, Any]:
    """Tune ``folder`` in place and return its ``tuning`` section (also put in report.json and
    the card when the folder has them). ``None`` takes the run's own value from report.json."""
    from .calibration import TextRequest, load_tokens
    from .model import ModelSource, load_tokenizer, read_config
    from .output_report import add_section, read_report
    from .preflight import resolve_device

    name = str(folder)
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise QuantkitError(f"{folder}: not a checkpoint folder (no config.json)", field="checkpoint",
                            file=folder / "config.json", hint="give the output folder of `quantkit run`")
    packed_bits(read_config(folder / "config.json", quantized_ok=True), name, folder)
    settings = TuneSettings(steps, lr, batch_size, seed)
    report = read_report(folder) or {}
    # The run's base at the run's revision; a --base of the user's own at its latest.
    revision = None if base else report.get("revision")
    base = base or report.get("model")
    if base is None:
        raise QuantkitError(f"{folder} has no report.json naming its base model", field="--base",
                            hint="pass --base MODEL (folder, hub id or builtin:smollm2-135m)")
    cal: dict[str, Any] = report.get("calibration") or {}
    source = source or cal.get("source")
    num, seq = num_samples or cal.get("num_samples"), max_seq_length or cal.get("max_seq_length")
    for value, flag in ((source, "--source"), (num, "--num-samples"), (seq, "--max-seq-length")):
        if value is None:
            raise QuantkitError(f"{folder}: its report.json records no calibration {flag[2:]}", field=flag,
                                hint=f"pass {flag}")
    if source == "self":
        raise QuantkitError(f"{folder}: the run calibrated on text the model generated, which tune does not "
                            "regenerate", field="--source", value=source, hint="pass --source with a text source")
    where = resolve_device(device, field="--device")
    model_dir = ModelSource.open(base, revision).path
    tokenizer = load_tokenizer(model_dir)
    # The run's text fields, read as it read them; a report.json without them is from a run
    # before they were recorded, which a tune: section required to leave at their defaults.
    calibration = load_tokens(TextRequest(
        source, num, seq, cal.get("packing", True), cal.get("seed", 0), True, cal.get("split", TextRequest.split),
        cal.get("subset"), cal.get("text_column", TextRequest.text_column), cal.get("messages_column")),
        tokenizer, model_dir)
    ev = report.get("evaluation") or {}
    evaluation = load_tokens(TextRequest(
        ev["source"], ev["num_windows"], ev["seq_len"], True, 0, False, ev.get("split", TextRequest.split), None,
        ev.get("text_column", TextRequest.text_column), section="evaluate"), tokenizer, model_dir) \
        if ev.get("source") else None
    result = {"base": base, "revision": revision,
              **tune_checkpoint(folder, model_dir, calibration, settings, where, evaluation, name=name,
                                quiet=quiet)}
    if evaluation:
        result["eval_source"] = ev["source"]
    if report:
        add_section(folder, "tuning", result)
    return result
