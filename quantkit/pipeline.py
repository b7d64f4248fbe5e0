"""pipeline.run: recipe in, published checkpoint (and report) out.

Everything that can be checked without reading weights is checked first, by the same
validation ``quantkit validate`` runs (``preflight.check``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, preflight, warmup
from .assignment_check import decoder_linear_names
from .calibration import TextRequest, load_tokens
from .card import base_license, render_card
from .checkpoint import CheckpointWriter, work_dir_for
from .distributed import World, world_from_environment
from .engine import LayerCallback, LayerwiseEngine, make_batches
from .errors import DistributedError, Interrupted, QuantkitError
from .evaluate import asymmetric_experts, loads_decompressed
from .export import StreamingExport
from .finite_check import check_source_tensors
from .formats import FORMATS
from .graph.runtime import ModelRunner, describe_outside
from .interrupts import as_run_failure, signal_name, signal_of, terminate_as_interrupt
from .model import ModelSource, load_tokenizer
from .moe import ExpertCalibration
from .output_guard import check_output_dir, run_inputs
from .planner import serve_command
from .quantizers import QUANTIZERS
from .recipe import CalibrationSpec, RecipeBase, TuneSpec, parse_size
from .rotation.online import DownProjHadamard
from .rotation.stream import StreamRotation
from .run_lock import RunLock
from .scheme import Scheme
from .scheme_names import plan_scheme_key, scheme_name
from .shard_check import check_model_files
from .weight_fingerprint import check_unchanged, fingerprint_weights
from .workdir import WorkDir, fingerprint

log = logging.getLogger(__name__)


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
    # Under torchrun each rank takes its own GPU (LOCAL_RANK); alone, the world of one.
    world = world_from_environment(preflight.resolve_device(recipe.device))
    if not world.is_main:  # rank 0 checks first: a bad recipe or model is one error line, not one per rank
        world.barrier()
    warm = warmup.start(world.device, recipe.quantization)
    plan, view = preflight.check_run(recipe)
    device, dtype = world.device, preflight.DTYPES[plan.dtype]
    compute = preflight.compute_dtype(device, dtype)
    warm.add(warmup.attention_steps(device, compute, plan.shape.num_heads, plan.shape.head_dim))
    # Only now are a hub model's weights downloaded.
    source = ModelSource.open(recipe.model.id, recipe.model.revision, recipe.model.allow_pickle,
                              os.environ.get("HF_TOKEN"))
    params = recipe.quantization
    scheme = params.scheme()
    assignment = params.assignment()
    quantizer = QUANTIZERS[params.method](params, source.config)
    fmt = FORMATS[recipe.format_name]()
    output_dir = recipe.export.output_dir
    workdir = WorkDir(work_dir_for(output_dir))
    if world.is_main:  # it may finish an interrupted publish: one writer
        check_output_dir(output_dir, workdir.root,
                         run_inputs(source.path, source.shard_files(), preflight.text_sources(recipe)),
                         recipe.export.overwrite)
    writer = CheckpointWriter(output_dir, workdir.export, fmt, dtype,
                              parse_size(recipe.export.max_shard_size), recipe.export.overwrite)
    # The model's own classes on the meta device and its layer graph (validation's): no weight is read.
    runner = ModelRunner(source, device, compute, f"model {recipe.model.id}", view)
    runner.check_supported()
    if params.rotate == "hadamard":
        runner.edits.append(StreamRotation(runner))
    linear_schemes = assignment.resolve(decoder_linear_names(runner.graph))
    if params.online_down_proj:
        runner.edits.append(DownProjHadamard(runner.graph, runner.names, linear_schemes.values(),
                                             recipe.format_name, runner.where))
    check_model_files(runner)
    tokenizer = load_tokenizer(source.path)
    check_source_tensors(source, runner.outside_text_sources(), device)
    if world.is_main:
        world.barrier()

    lock = RunLock(output_dir, None if recipe_file is None else str(Path(recipe_file).resolve()))
    with lock if world.is_main else contextlib.nullcontext(), terminate_as_interrupt():
        started_work = False
        try:
            weights = fingerprint_weights(source.path, list(source.weight_map.values()),
                                          recipe.model.fingerprint == "full", quiet) if world.is_main else None
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
            start = _start_workdir(world, run_id, calib, cal.batch_size,
                                   lambda: workdir.start(run_id, resume, weights, source.path))
            started_work = True
            # The writing rank exports each layer as the engine finishes it, in the background.
            export = StreamingExport(runner, writer) if world.is_main else None
            try:
                if export is not None:
                    export.start()
                engine = LayerwiseEngine(runner, quantizer, workdir, run_id, quiet, on_layer, seed=cal.seed,
                                         experts=ExpertCalibration(cal.all_experts, cal.min_expert_tokens),
                                         world=world, on_record=None if export is None else export.hand_off)
                warm.join()
                result = engine.run(calib, evaluation, cal.batch_size, start)
                if export is None:
                    return {}
                exporting = time.perf_counter()
                workdir.wait()  # a failed work-folder write stops the run, as when the export read it back
                export.finish()
                result.phase_seconds["export"] = time.perf_counter() - exporting
            finally:
                if export is not None:
                    export.close()
            outside = describe_outside(runner.model, runner.location.layers)
            report = _report(recipe, source, scheme, device, calib, evaluation, result, writer, started,
                             linear_schemes)
            report["unquantized"] = unquantized_report(runner, outside)
            report["experts"] = _experts_report(runner, cal, result)
            config = dict(source.config)
            # The checkpoint's names, as transformers and vLLM match them.
            named = {runner.names.source_module(n): s for n, s in linear_schemes.items()}
            floats = [runner.names.source_module(n) for n in decoder_linear_names(runner.graph)
                      if n not in linear_schemes]
            config["quantization_config"] = fmt.quantization_config(
                scheme if assignment.uniform else named, [*ignored_components(runner, outside), *floats],
                params.kv_cache_scheme())
            config["torch_dtype"] = str(dtype).replace("torch.", "")
            for edit in runner.edits:
                config.update(edit.config_updates())
                config["quantization_config"].update(edit.quantization_config_updates())
            report["load_decompressed"] = loads_decompressed(config) and not asymmetric_experts(config)
            extra_files = {"report.json": json.dumps(report, indent=2),
                           "README.md": render_card(report, base_license(source.path))}
            copy = source.companion_files()
            check_unchanged(weights, fingerprint_weights(source.path, list(weights)), source.path,
                            "before publishing")
            writer.finalize(config, extra_files, copy)
        except BaseException as e:
            if not world.is_main:  # rank 0 alone keeps or cleans the work folder
                raise
            failure = as_run_failure(e, workdir.root, workdir.finished_layers(), runner.num_layers, output_dir,
                                     writer.published)
            if started_work:
                _clean_up_after_failure(workdir, writer, failure)
            if failure is None:
                raise
            raise failure from None
        workdir.remove()
        log.info("wrote %s", output_dir)
        if recipe.tune is not None:  # before the push: the tuned checkpoint is the one published
            report["tuning"] = _tune_published(output_dir, recipe.tune, recipe.calibration, device, quiet)
        if recipe.push is not None:
            _push(output_dir, recipe.push)
    return report


def _start_workdir(world: World, run_id: str, calib: list[torch.Tensor], batch_size: int,
                   start: Callable[[], int]) -> int:
    """Rank 0 prepares the work folder (``start()``); every rank learns how many layers are
    finished and checks that it computed the same run (model, recipe, calibration tokens)."""
    batches = len(make_batches(calib, batch_size))
    if calib and batches < world.size:
        raise DistributedError(f"{world.size} ranks but only {batches} calibration batches",
                               field="calibration.num_samples", value=len(calib),
                               hint="give each rank at least one batch: more samples or a smaller batch_size")
    finished = torch.zeros(1, dtype=torch.int64, device=world.device)
    ours = torch.frombuffer(bytearray(bytes.fromhex(run_id)), dtype=torch.uint8).to(world.device)
    if world.is_main:
        finished += start()
    shared, _ = world.broadcast({"start": finished, "run": ours.clone()}, 0)
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
    return names + layer_float_matrices(runner)


def layer_float_matrices(runner: ModelRunner) -> list[str]:
    """Matrices inside the decoder layers that stay in float (routers, Qwen2-MoE's shared-expert
    gate), as ``re:`` patterns anchored at the module's end, in the checkpoint's names: vLLM
    builds some of them as quantizable Linears and must find them ignored."""
    import re

    out: list[str] = []
    for t, g in enumerate(runner.graph.types):
        i = runner.graph.layers_of(t)[0]
        prefix = runner.layer_prefix(i)
        for u in g.unquantized:
            mod = runner.model.get_submodule(prefix + u.module)
            if not any(p.dim() == 2 for p in mod.parameters(recurse=False)):
                continue
            src = runner.names.source_module(prefix + u.module)
            layer_src = runner.names.source_module(prefix[:-1])
            rel = src[len(layer_src) + 1:] if src.startswith(layer_src + ".") else u.module
            pattern = rf"re:.*\.{re.escape(rel)}$"
            if pattern not in out:
                out.append(pattern)
    return out


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


def _clean_up_after_failure(workdir: WorkDir, writer: CheckpointWriter, failure: QuantkitError | None) -> None:
    """Keep finished layers for --resume; after an interrupt or a full disk (whose line says what
    was kept) also free the half-written export, which a resume writes anew."""
    if writer.published or not workdir.layer_path(0).is_file():
        workdir.remove()
    elif failure is None:
        log.warning("finished layers are kept in %s; run again with --resume to continue", workdir.root)
    else:
        shutil.rmtree(workdir.export, ignore_errors=True)


def _tune_published(output_dir: Path, tune: TuneSpec, calibration: CalibrationSpec, device: torch.device,
                    quiet: bool) -> dict[str, Any]:
    """The recipe's ``tune:`` run on the published folder as ``quantkit tune`` runs it; returns
    its report section. The shards are rewritten all or nothing, so a failure leaves the
    published checkpoint untuned, which the error says, with the command that tunes it as the
    recipe asked."""
    from .folder_tuning import tune_folder

    retry = " ".join(["quantkit tune", str(output_dir), "--num-samples", str(calibration.num_samples),
                      *tune.flags(), "--seed", str(calibration.seed)])
    untuned = f"{output_dir} holds the untuned quantized checkpoint"
    try:
        # report.json counts the windows the quantizer read: none where it reads no text (RTN).
        return tune_folder(output_dir, num_samples=calibration.num_samples, seed=calibration.seed,
                           device=str(device), quiet=quiet, **tune.settings())
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted by {signal_name(e)} while tuning; {untuned}", signal=signal_of(e),
                          hint=f"tune it with: {retry}") from None
    except QuantkitError as e:
        hint = f"{e.hint}, then retry with: {retry}" if e.hint else f"retry with: {retry}"
        raise type(e)(f"tuning failed: {e.message}; {untuned}", field=e.field, value=e.value, hint=hint,
                      file=e.file) from e


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


def _self_generate(model_dir: Path, dtype: torch.dtype, device: torch.device, n: int, length: int, seed: int):
    from .selfgen import sample_from_model

    return sample_from_model(model_dir, dtype, device, n, length, seed)


def _report(recipe: RecipeBase, source: ModelSource, scheme: Scheme, device: torch.device,
            calib: list[torch.Tensor], evaluation: list[torch.Tensor] | None, result: Any,
            writer: CheckpointWriter, started: float, linear_schemes: dict[str, Scheme]) -> dict[str, Any]:
    base_bytes = sum((source.path / s).stat().st_size for s in set(source.weight_map.values()))
    ev = recipe.evaluate
    evaluation_report = None
    if evaluation:
        evaluation_report = {
            "source": ev.source, "split": ev.split, "text_column": ev.text_column,
            "num_windows": len(evaluation), "seq_len": ev.max_seq_length,
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
        "linears": _linear_counts(linear_schemes),
        "format": recipe.format_name,
        "output_dir": str(recipe.export.output_dir),
        "device": str(device),
        "calibration": {"source": cal.source, "split": cal.split, "subset": cal.subset,
                        "text_column": cal.text_column, "messages_column": cal.messages_column,
                        "num_samples": len(calib), "max_seq_length": cal.max_seq_length,
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


def _linear_counts(linear_schemes: dict[str, Scheme]) -> dict[str, int]:
    """How many decoder Linears each scheme quantized (one entry unless the recipe is mixed)."""
    counts: dict[str, int] = {}
    for s in linear_schemes.values():
        counts[scheme_name(s)] = counts.get(scheme_name(s), 0) + 1
    return counts


def _experts_report(runner: ModelRunner, cal: Any, result: Any) -> dict[str, Any] | None:
    """Per-expert token counts (checkpoint names of the experts modules) and the experts that
    fell back to round-to-nearest; None for a model without experts."""
    rep = result.experts
    if not rep.routed and not rep.rtn_fallback:
        return None
    names = runner.names
    return {"all_experts": cal.all_experts, "min_expert_tokens": cal.min_expert_tokens,
            "routed_tokens": {names.source_module(k): v for k, v in rep.routed.items()},
            "statistics_tokens": {names.source_module(k): v for k, v in rep.statistics_tokens.items()},
            "rtn_fallback": [names.source_module(n) for n in rep.rtn_fallback]}


__all__ = ["run", "QuantkitError"]
