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
from .calibration import TextRequest, load_tokens
from .card import base_license, render_card
from .checkpoint import CheckpointWriter, work_dir_for
from .engine import LayerCallback, LayerwiseEngine, make_batches
from .distributed import World, world_from_environment
from .errors import DistributedError, ExportError, QuantkitError, RecipeError
from .export import export_checkpoint
from .graph.model import ModelGraph
from .graph.runtime import ModelRunner, describe_outside
from .formats import FORMATS
from .model import ModelSource
from .planner import serve_command
from .quantizers import QUANTIZERS
from .recipe import RecipeBase, parse_size
from .scheme import Scheme
from .workdir import WorkDir, fingerprint

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"device: '{name}' asked for but CUDA is not available; use device: cpu")
    return torch.device(name)


def resolve_dtype(name: str, config: dict[str, Any]) -> torch.dtype:
    if name == "auto":
        name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return _DTYPES.get(name, torch.float32)


def check_model_fits_scheme(graph: ModelGraph, scheme: Scheme, where: str) -> None:
    """Group sizes must divide the input size of every unit the graph quantizes (its real
    shape, read off the model's own modules): say so before reading weights."""
    ws = scheme.weights
    if ws.strategy != "group" or not ws.group_size:
        return
    units = [(t, u) for t in graph.types for u in t.units]
    for t, u in units:
        if u.in_features % ws.group_size:
            divisors = [g for g in (32, 64, 128) if all(v.in_features % g == 0 for _, v in units)]
            raise RecipeError(
                f"{where}: quantization.group_size {ws.group_size} does not divide the input size "
                f"{u.in_features} of {u.name} ({t.layer_class})", field="quantization.group_size",
                value=ws.group_size, hint=f"use one of {divisors or [-1]}")


def run(recipe: RecipeBase, quiet: bool = False, on_layer: LayerCallback | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Quantize, evaluate, export and (if asked) push; returns the report.

    With ``resume`` a run killed part-way continues from its last finished layer (kept in a
    hidden work folder beside ``export.output_dir``) and writes the same checkpoint.
    """
    started = time.perf_counter()
    # Under torchrun each rank takes its own GPU (LOCAL_RANK); alone, the world of one.
    world = world_from_environment(resolve_device(recipe.device))
    device = world.device
    if not world.is_main:  # rank 0 checks first: a bad recipe or model is one error line, not one per rank
        world.barrier()
    token = os.environ.get("HF_TOKEN")
    source = ModelSource.open(recipe.model.id, recipe.model.revision, recipe.model.allow_pickle, token)
    params = recipe.quantization
    scheme = params.scheme()
    dtype = resolve_dtype(recipe.model.dtype, source.config)
    # CPUs here run bf16 matmuls ~8x slower than fp32, so compute in fp32 and export in dtype.
    compute_dtype = torch.float32 if device.type == "cpu" else dtype
    # The model's own classes on the meta device and its layer graph: no weight is read.
    runner = ModelRunner(source, device, compute_dtype, f"model {recipe.model.id}")
    runner.check_supported()
    check_model_fits_scheme(runner.graph, scheme, "recipe")
    max_pos = getattr(runner.text_config, "max_position_embeddings", None)
    for section, spec in (("calibration", recipe.calibration), ("evaluate", recipe.evaluate)):
        if max_pos and spec.max_seq_length > max_pos:
            raise RecipeError(f"recipe: {section}.max_seq_length {spec.max_seq_length} exceeds the model's "
                              f"max_position_embeddings ({max_pos})")
    fmt = FORMATS[recipe.format_name]()
    workdir = WorkDir(work_dir_for(recipe.export.output_dir))
    writer = CheckpointWriter(recipe.export.output_dir, workdir.export, fmt, dtype,
                              parse_size(recipe.export.max_shard_size), recipe.export.overwrite)
    writer.check_target()
    check_disk_space(recipe.export.output_dir, source.config, scheme)
    if world.is_main:
        world.barrier()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    quantizer = QUANTIZERS[params.method](params, source.config)
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
    start = _start_workdir(world, workdir, run_id, resume, calib, cal.batch_size)
    try:
        engine = LayerwiseEngine(runner, quantizer, workdir, run_id, quiet, on_layer, world)
        result = engine.run(calib, evaluation, cal.batch_size, start)
        if not world.is_main:
            return {}
        exporting = time.perf_counter()
        writer.start()
        export_checkpoint(runner, workdir, writer, quiet)
        result.phase_seconds["export"] = time.perf_counter() - exporting
        outside = describe_outside(runner.model, runner.location.layers)
        report = _report(recipe, source, scheme, device, calib, evaluation, result, writer, started)
        report["unquantized"] = unquantized_report(runner, outside)
        config = dict(source.config)
        config["quantization_config"] = fmt.quantization_config(
            scheme, ignored_components(runner, outside), params.kv_cache_scheme())
        config["torch_dtype"] = str(dtype).replace("torch.", "")
        extra_files = {"report.json": json.dumps(report, indent=2),
                       "README.md": render_card(report, base_license(source.path))}
        copy = source.tokenizer_files() + [p for p in [source.path / "generation_config.json"] if p.is_file()]
        writer.finalize(config, extra_files, copy)
    except BaseException:
        if not world.is_main:
            raise
        if workdir.layer_path(0).is_file():
            log.warning("finished layers are kept in %s; run again with --resume to continue", workdir.root)
        else:
            workdir.remove()
        raise
    workdir.remove()
    log.info("wrote %s", recipe.export.output_dir)
    if recipe.push is not None:
        from .hub import push_folder

        p = recipe.push
        push_folder(recipe.export.output_dir, p.repo_id, private=p.private, revision=p.revision,
                    commit_message=p.commit_message)
    return report


def _start_workdir(world: World, workdir: WorkDir, run_id: str, resume: bool, calib: list[torch.Tensor],
                   batch_size: int) -> int:
    """Rank 0 prepares the work folder; every rank learns how many layers are finished and
    checks that it computed the same run (model, recipe, calibration tokens) as rank 0."""
    batches = len(make_batches(calib, batch_size))
    if calib and batches < world.size:
        raise DistributedError(f"{world.size} ranks but only {batches} calibration batches",
                               field="calibration.num_samples", value=len(calib),
                               hint="give each rank at least one batch: more samples or a smaller batch_size")
    start = torch.zeros(1, dtype=torch.int64, device=world.device)
    ours = torch.frombuffer(bytearray(bytes.fromhex(run_id)), dtype=torch.uint8).to(world.device)
    theirs = ours.clone()
    if world.is_main:
        start += workdir.start(run_id, resume)
    shared, _ = world.broadcast({"start": start, "run": theirs}, 0)
    if not torch.equal(shared["run"], ours):
        raise DistributedError(f"rank {world.rank} computed a different run than rank 0 (model files, recipe or "
                               "calibration tokens differ)", hint="run every rank on the same files and recipe")
    return int(shared["start"].item())


def ignored_components(runner: ModelRunner, outside: list[tuple[str, str]]) -> list[str]:
    """The module trees outside the decoder layers that hold Linears (lm_head, a vision tower,
    a projector), which a format declares unquantized so transformers and vLLM look for no
    quantized tensors there: a top-level Linear by its name, any other tree by a pattern on its
    last path segment, which every naming of the model (transformers', the checkpoint's,
    vLLM's) shares."""
    from torch import nn

    from .formats.base import segment_pattern

    names = []
    for path, _ in outside:
        mod = runner.model.get_submodule(path)
        if isinstance(mod, nn.Linear) and "." not in path:
            names.append(path)
        elif any(isinstance(m, nn.Linear) for m in mod.modules()):
            names.append(segment_pattern(path.rpartition(".")[2]))
    return names


def unquantized_report(runner: ModelRunner, outside: list[tuple[str, str]]) -> list[dict[str, str]]:
    """What stayed in float and why, for the report and the model card."""
    names = runner.names
    out = [{"module": names.source_module(path), "reason": why} for path, why in outside]
    layers = names.source_module(runner.layer_prefix(0)[:-1]).rpartition(".")[0]
    seen: set[tuple[str, str]] = set()
    for g in runner.graph.types:
        for u in g.unquantized:
            if (u.module, u.reason) not in seen:
                seen.add((u.module, u.reason))
                out.append({"module": f"{layers}.*.{u.module}", "reason": u.reason})
    return out


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
