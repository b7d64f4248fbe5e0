"""pipeline.run: recipe in, published checkpoint (and report) out.

Everything that can be checked without reading weights is checked first: the recipe, the
model's config and architecture, group sizes against the model's dimensions, sequence length
against its context, and the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architectures import Architecture, architecture_for
from .calibration import TextRequest, load_tokens
from .card import base_license, render_card
from .checkpoint import CheckpointWriter, work_dir_for
from .engine import LayerCallback, LayerwiseEngine
from .errors import ExportError, Interrupted, ModelError, QuantkitError, RecipeError
from .export import export_checkpoint
from .finite_check import check_source_tensors
from .formats import FORMATS
from .interrupts import as_run_failure, signal_name, signal_of, terminate_as_interrupt
from .layers import ModelSkeleton
from .model import ModelSource, load_tokenizer
from .output_guard import check_output_dir, run_inputs
from .planner import ModelShape, serve_command
from .quantizers import QUANTIZERS
from .recipe import RecipeBase, parse_size
from .run_lock import RunLock
from .scheme import Scheme
from .shard_check import check_model_files
from .weight_fingerprint import check_unchanged, fingerprint_weights
from .workdir import WorkDir, fingerprint

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """The recipe's ``device`` as a torch device, or a `RecipeError` saying what exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hint = "use device: auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(f"device: '{name}' is not a device", field="device", value=name, hint=hint) from None
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"device: '{name}' is not supported", field="device", value=name, hint=hint)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: '{name}' asked for but CUDA is not available; use device: cpu",
                          field="device", value=name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RecipeError(f"device: '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)",
                          field="device", value=name, hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, config: dict[str, Any]) -> torch.dtype:
    if name == "auto":
        name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return _DTYPES.get(name, torch.float32)


def check_model_fits_scheme(config: dict[str, Any], arch: Architecture, scheme: Scheme, where: str) -> None:
    """Group sizes must divide every quantized Linear's input size: say so before reading weights."""
    ws = scheme.weights
    if ws.strategy != "group" or not ws.group_size:
        return
    dims = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"]}
    heads = config["num_attention_heads"]
    dims["num_attention_heads × head_dim"] = heads * config.get("head_dim", config["hidden_size"] // heads)
    for name, d in dims.items():
        if d % ws.group_size:
            divisors = [g for g in (32, 64, 128) if all(v % g == 0 for v in dims.values())]
            raise RecipeError(f"{where}: quantization.group_size {ws.group_size} does not divide the model's "
                              f"{name} ({d}); use one of {divisors or [-1]}")


def run(recipe: RecipeBase, quiet: bool = False, on_layer: LayerCallback | None = None,
        resume: bool = False, recipe_file: Path | None = None) -> dict[str, Any]:
    """Quantize, evaluate, export and (if asked) push; returns the report.

    With ``resume`` a run killed part-way continues from its last finished layer (kept in a
    hidden work folder beside ``export.output_dir``) and writes the same checkpoint. One run at
    a time holds an output folder; Ctrl-C, SIGTERM or a full disk end the run with one line
    saying what was kept, the output untouched. ``recipe_file``, the YAML the recipe came from,
    is named in the run's lock, so a second run says which recipe holds the folder.
    """
    started = time.perf_counter()
    token = os.environ.get("HF_TOKEN")
    source = ModelSource.open(recipe.model.id, recipe.model.revision, recipe.model.allow_pickle, token)
    ModelShape.from_config(source.config, str(source.path / "config.json"))
    arch = architecture_for(source.config, f"model {recipe.model.id}")
    params = recipe.quantization
    scheme = params.scheme()
    check_model_fits_scheme(source.config, arch, scheme, "recipe")
    quantizer = QUANTIZERS[params.method](params, source.config)
    check_context_length(source.config, recipe, quantizer.needs_calibration)
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.model.dtype, source.config)
    fmt = FORMATS[recipe.format_name]()
    output_dir = recipe.export.output_dir
    workdir = WorkDir(work_dir_for(output_dir))
    check_output_dir(output_dir, workdir.root, run_inputs(source.path, source.shard_files(), _text_sources(recipe)),
                     recipe.export.overwrite)
    writer = CheckpointWriter(output_dir, workdir.export, fmt, dtype,
                              parse_size(recipe.export.max_shard_size), recipe.export.overwrite)
    check_disk_space(output_dir, source.config, scheme)
    # CPUs here run bf16 matmuls ~8x slower than fp32, so compute in fp32 and export in dtype.
    compute_dtype = torch.float32 if device.type == "cpu" else dtype
    skeleton = build_skeleton(source, arch, device, compute_dtype)
    check_model_files(source, skeleton.meta, skeleton.tied)
    tokenizer = load_tokenizer(source.path)
    check_source_tensors(source, [arch.embed + ".weight", skeleton.lm_head_source_name()]
                         + [n for n in source.weight_map if n.startswith(arch.final_norm + ".")], device)

    with RunLock(output_dir, None if recipe_file is None else str(Path(recipe_file).resolve())), \
            terminate_as_interrupt():
        started_work = False
        try:
            weights = fingerprint_weights(source.path, list(source.weight_map.values()),
                                          recipe.model.fingerprint == "full", quiet)
            calib: list[torch.Tensor] = []
            cal = recipe.calibration
            if quantizer.needs_calibration:
                calib = load_tokens(
                    TextRequest(cal.source, cal.num_samples, cal.max_seq_length, cal.packing, cal.seed, True,
                                cal.split, cal.subset, cal.text_column, cal.messages_column),
                    tokenizer, source.path,
                    generate=lambda n, length, seed: _self_generate(source.path, dtype, device, n, length, seed),
                )
            evaluation = None
            ev = recipe.evaluate
            if ev.enabled:
                evaluation = load_tokens(TextRequest(ev.source, ev.num_samples, ev.max_seq_length, True, 0, False,
                                                     ev.split, None, ev.text_column, section="evaluate"),
                                         tokenizer, source.path)

            run_id = fingerprint(__version__, recipe.model.model_dump(mode="json"), params.model_dump(mode="json"),
                                 cal.model_dump(mode="json"), source.weight_map, calib)
            start = workdir.start(run_id, resume, weights, source.path)
            started_work = True
            engine = LayerwiseEngine(skeleton, quantizer, workdir, run_id, quiet, on_layer)
            result = engine.run(calib, evaluation, cal.batch_size, start)
            exporting = time.perf_counter()
            writer.start()
            export_checkpoint(skeleton, workdir, writer, quiet)
            result.phase_seconds["export"] = time.perf_counter() - exporting
            report = _report(recipe, source, scheme, device, calib, evaluation, result, writer, started)
            config = dict(source.config)
            config["quantization_config"] = fmt.quantization_config(scheme, [arch.lm_head], params.kv_cache_scheme())
            config["torch_dtype"] = str(dtype).replace("torch.", "")
            extra_files = {"report.json": json.dumps(report, indent=2),
                           "README.md": render_card(report, base_license(source.path))}
            copy = source.tokenizer_files() + [p for p in [source.path / "generation_config.json"] if p.is_file()]
            check_unchanged(weights, fingerprint_weights(source.path, list(weights)), source.path,
                            "before publishing")
            writer.finalize(config, extra_files, copy)
        except BaseException as e:
            failure = as_run_failure(e, workdir.root, workdir.finished_layers(), skeleton.num_layers, output_dir,
                                     writer.published)
            if started_work:
                _clean_up_after_failure(workdir, writer, failure)
            if failure is None:
                raise
            raise failure from None
        workdir.remove()
        log.info("wrote %s", output_dir)
        if recipe.push is not None:
            _push(output_dir, recipe.push)
    return report


def _clean_up_after_failure(workdir: WorkDir, writer: CheckpointWriter, failure: QuantkitError | None) -> None:
    """Keep finished layers for --resume; after an interrupt or a full disk (whose line says what
    was kept) also free the half-written export, which a resume writes anew."""
    if writer.published or not workdir.layer_path(0).is_file():
        workdir.remove()
    elif failure is None:
        log.warning("finished layers are kept in %s; run again with --resume to continue", workdir.root)
    else:
        shutil.rmtree(workdir.export, ignore_errors=True)


def build_skeleton(source: ModelSource, arch: Architecture, device: torch.device, dtype: torch.dtype) -> ModelSkeleton:
    """The model on the meta device; a config.json transformers refuses (an unknown model_type, a
    malformed rope_scaling ...) is a `ModelError` naming it, not a traceback."""
    try:
        return ModelSkeleton(source, arch, device, dtype)
    except Exception as e:  # transformers' config classes raise many types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"model.id: {source.path / 'config.json'}: transformers cannot build the model from it "
                         f"({type(e).__name__}: {first})", field="model.id", file=source.path / "config.json",
                         hint="fix or re-download config.json") from None


def check_context_length(config: dict[str, Any], recipe: RecipeBase, calibrates: bool) -> None:
    """Sequences longer than the model's context, in the sections that run."""
    max_pos = config.get("max_position_embeddings")
    sections = [("calibration", recipe.calibration)] if calibrates else []
    sections += [("evaluate", recipe.evaluate)] if recipe.evaluate.enabled else []
    for section, spec in sections:
        if isinstance(max_pos, int) and spec.max_seq_length > max_pos:
            raise RecipeError(f"recipe: {section}.max_seq_length {spec.max_seq_length} exceeds the model's "
                              f"max_position_embeddings ({max_pos})", field=f"{section}.max_seq_length",
                              value=spec.max_seq_length)


def _text_sources(recipe: RecipeBase) -> dict[str, str]:
    """The text sources the recipe names, by recipe field (protected from the output even where unused)."""
    return {"calibration.source": recipe.calibration.source, "evaluate.source": recipe.evaluate.source}


def _push(output_dir: Path, push: Any) -> None:
    """Push the published folder; an interrupt here leaves the checkpoint complete, so say so."""
    from .hub import push_folder

    try:
        push_folder(output_dir, push.repo_id, private=push.private, revision=push.revision,
                    commit_message=push.commit_message)
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted by {signal_name(e)} during the push; the checkpoint in {output_dir} is "
                          "complete", signal=signal_of(e),
                          hint=f"push it with: quantkit push {output_dir} {push.repo_id}") from None


def check_disk_space(output_dir: Path, config: dict[str, Any], scheme: Scheme) -> None:
    """Refuse to start when the work files plus the checkpoint cannot fit on the output's disk.

    The estimate is the planner's checkpoint size plus the work folder's unpacked codes
    (one byte per quantized weight, as int8/fp8 codes).
    """
    from .planner import ModelShape, get_scheme, weight_bytes

    shape = ModelShape.from_config(config)
    needed = weight_bytes(shape, get_scheme(plan_scheme_key(scheme))).total
    needed += weight_bytes(shape, get_scheme("w8a8-int8")).linears
    target = Path(output_dir).resolve().parent
    while not target.exists():
        target = target.parent
    free = shutil.disk_usage(target).free
    if free < needed:
        raise ExportError(f"export.output_dir {output_dir}: {free / 1e9:.1f} GB free on its disk, about "
                          f"{needed / 1e9:.1f} GB needed (work files + checkpoint); free space or choose another folder")


def _self_generate(model_dir: Path, dtype: torch.dtype, device: torch.device, n: int, length: int, seed: int):
    from .selfgen import sample_from_model

    return sample_from_model(model_dir, dtype, device, n, length, seed)


def _report(recipe: RecipeBase, source: ModelSource, scheme: Scheme, device: torch.device,
            calib: list[torch.Tensor], evaluation: list[torch.Tensor] | None, result: Any,
            writer: CheckpointWriter, started: float) -> dict[str, Any]:
    base_bytes = sum((source.path / s).stat().st_size for s in set(source.weight_map.values()))
    ev = recipe.evaluate
    evaluation_report = None
    if evaluation:
        evaluation_report = {
            "source": ev.source, "num_windows": len(evaluation), "seq_len": ev.max_seq_length,
            "perplexity_base": result.perplexity_base, "perplexity_quantized": result.perplexity_quantized,
            **(result.divergence or {}),
        }
    cal = recipe.calibration
    return {
        "quantkit_version": __version__,
        "model": recipe.model.id,
        "revision": recipe.model.revision,
        "method": recipe.quantization.method,
        "quantization": recipe.quantization.model_dump(),
        "scheme": {"weights": asdict(scheme.weights),
                   "input_activations": asdict(scheme.input_activations) if scheme.input_activations else None},
        "scheme_name": scheme_name(scheme),
        "format": recipe.format_name,
        "output_dir": str(recipe.export.output_dir),
        "device": str(device),
        "calibration": {"source": cal.source, "num_samples": len(calib), "max_seq_length": cal.max_seq_length,
                        "packing": cal.packing, "seed": cal.seed},
        "evaluation": evaluation_report,
        "size_bytes": {"base": base_bytes, "quantized": writer.total_bytes},
        "timing": {"total_seconds": time.perf_counter() - started,
                   "layer_seconds_mean": sum(result.layer_seconds) / max(len(result.layer_seconds), 1),
                   "layer_seconds": result.layer_seconds,
                   "phase_seconds": result.phase_seconds},
        "serve_command": serve_command(
            recipe.push.repo_id if recipe.push else str(recipe.export.output_dir), source.config,
            plan_scheme_key(scheme), kv_cache_dtype="fp8" if recipe.quantization.kv_cache_scheme() else "auto"),
    }


def plan_scheme_key(scheme: Scheme) -> str:
    """The planner's name for the closest precision (it sizes the serve line)."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float":
        return "fp8"
    if a is not None or w.num_bits == 8:
        return "w8a8-int8"
    return "w4a16" if w.symmetric else "w4a16-asym"


def scheme_name(scheme: Scheme) -> str:
    """The usual short name: W4A16, W8A8, FP8, W8A8-FP8-static ..."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float":
        return "FP8" + ("" if a is None or a.dynamic else "-static")
    name = f"W{w.num_bits}A{a.num_bits if a else 16}"
    if w.strategy == "group":
        name += f"-g{w.group_size}"
    if not w.symmetric:
        name += "-asym"
    return name + ("" if a is None or a.dynamic else "-static")


__all__ = ["run", "QuantkitError"]
