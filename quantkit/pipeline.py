"""pipeline.run: recipe in, published checkpoint (and report) out.

Everything that can be checked without reading weights is checked first, by the same
validation ``quantkit validate`` runs (``preflight.check``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import __version__, preflight
from .architectures import architecture_for
from .calibration import TextRequest, load_tokens
from .card import base_license, render_card
from .checkpoint import CheckpointWriter, work_dir_for
from .engine import LayerCallback, LayerwiseEngine
from .errors import QuantkitError
from .export import export_checkpoint
from .formats import FORMATS
from .layers import ModelSkeleton
from .model import ModelSource
from .planner import serve_command
from .quantizers import QUANTIZERS
from .recipe import RecipeBase, parse_size
from .scheme import Scheme
from .scheme_names import plan_scheme_key, scheme_name
from .workdir import WorkDir, fingerprint

log = logging.getLogger(__name__)


def run(recipe: RecipeBase, quiet: bool = False, on_layer: LayerCallback | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Quantize, evaluate, export and (if asked) push; returns the report.

    With ``resume`` a run killed part-way continues from its last finished layer (kept in a
    hidden work folder beside ``export.output_dir``) and writes the same checkpoint.
    """
    started = time.perf_counter()
    plan = preflight.check(recipe)
    # Only now are a hub model's weights downloaded.
    source = ModelSource.open(recipe.model.id, recipe.model.revision, recipe.model.allow_pickle,
                              os.environ.get("HF_TOKEN"))
    arch = architecture_for(source.config, f"model {recipe.model.id}")
    params = recipe.quantization
    scheme = params.scheme()
    device, dtype = torch.device(plan.device), preflight.DTYPES[plan.dtype]
    fmt = FORMATS[recipe.format_name]()
    workdir = WorkDir(work_dir_for(recipe.export.output_dir))
    writer = CheckpointWriter(recipe.export.output_dir, workdir.export, fmt, dtype,
                              parse_size(recipe.export.max_shard_size), recipe.export.overwrite)

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

    # CPUs here run bf16 matmuls ~8x slower than fp32, so compute in fp32 and export in dtype.
    compute_dtype = torch.float32 if device.type == "cpu" else dtype
    skeleton = ModelSkeleton(source, arch, device, compute_dtype)
    run_id = fingerprint(__version__, recipe.model.model_dump(mode="json"), params.model_dump(mode="json"),
                         cal.model_dump(mode="json"), source.weight_map, calib)
    start = workdir.start(run_id, resume)
    try:
        engine = LayerwiseEngine(skeleton, quantizer, workdir, run_id, quiet, on_layer, seed=cal.seed)
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
        writer.finalize(config, extra_files, copy)
    except BaseException:
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


__all__ = ["run", "QuantkitError"]
