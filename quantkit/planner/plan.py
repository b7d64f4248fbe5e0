"""Plan serving a model: one row per precision, a recommendation and its serve command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..gpus import GPU, get_gpu
from .budget import KVCacheDtype, check_request, engine_defaults, plan_scheme, required_context
from .config import load_config
from .precision import SCHEMES, get_scheme
from .recommend import plan_notes, recommend
from .quantize import SHIPPED_4BIT, Calibrating, quantize_memory
from .result import PlanResult
from .serve import render_serve
from .shape import ModelShape, check_tensor_parallel, count_parameters

log = logging.getLogger(__name__)


def plan_config(
    config: dict[str, Any],
    gpu: str | GPU = "H100-80GB",
    *,
    gpus: int = 1,
    context: int | None = None,
    batch: int = 1,
    kv_cache_dtype: KVCacheDtype = "auto",
    gpu_memory_utilization: float = 0.9,
    group_size: int | None = None,
    model: str = "model",
    checkpoint_quantized: bool = False,
    calibrating: Calibrating = SHIPPED_4BIT,
) -> PlanResult:
    """``plan_model`` for a config dict already in hand (``model`` only names it in output);
    ``calibrating`` is the quantizer the quantization-time line counts."""
    shape = ModelShape.from_config(config, where=f"{model}/config.json")
    device = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    check_request(batch, context, gpu_memory_utilization)
    check_tensor_parallel(shape, gpus)
    kwargs = dict(gpus=gpus, context=context, batch=batch, kv_cache_dtype=kv_cache_dtype,
                  gpu_memory_utilization=gpu_memory_utilization)
    rows = [plan_scheme(shape, get_scheme(n, group_size), device, **kwargs) for n in SCHEMES]
    best = recommend(rows, shape, context)
    request = {**kwargs, "model": model, "checkpoint_quantized": checkpoint_quantized}
    notes = plan_notes(shape, device, rows, best, request)
    command = None
    if best is not None:
        chosen = next(r for r in rows if r.scheme == best)
        command = render_serve(model, shape, SCHEMES[best], chosen, gpus, context, kv_cache_dtype,
                                gpu_memory_utilization, checkpoint_quantized)
    defaults = engine_defaults(device)
    log.debug("planned %s on %d x %s: recommended %s", model, gpus, device.name, best)
    return PlanResult(
        model=model,
        architecture=shape.architecture,
        parameters=count_parameters(shape),
        max_position_embeddings=shape.max_position_embeddings,
        gpu=device.name,
        gpu_memory_bytes=device.memory_bytes,
        gpus=gpus,
        batch=batch,
        context=context,
        required_context=required_context(shape, context),
        kv_cache_dtype=kv_cache_dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=defaults.max_num_batched_tokens,
        max_num_seqs=defaults.max_num_seqs,
        rows=rows,
        recommended=best,
        serve_command=command,
        notes=notes,
        quantize_memory=quantize_memory(shape, calibrating, gpus=gpus),
        experts=shape.num_experts,
        moe_layers=shape.moe_layers,
    )


def plan_model(
    model: str | None = None,
    gpu: str = "H100-80GB",
    gpus: int = 1,
    context: int | None = None,
    batch: int = 1,
    kv_cache_dtype: KVCacheDtype = "auto",
    gpu_memory_utilization: float = 0.9,
    group_size: int | None = None,
    revision: str | None = None,
    recipe: str | Path | None = None,
) -> PlanResult:
    """Plan serving ``model`` (local folder or hub id; only config.json is read) with vLLM.

    >>> result = plan_model("meta-llama/Llama-3.1-70B-Instruct", gpu="H100-80GB", gpus=2)
    >>> result.recommended, result.row("bf16").max_model_len
    >>> print(result.serve_command)

    ``context`` is the max_model_len you need (None: as long as fits), ``batch`` how many
    sequences of that length must be in the KV cache at once. The quantization-time line
    counts ``recipe``'s quantizer and calibration size (a recipe file or a shipped recipe's
    name; its model unless ``model`` is given), else the shipped 4-bit recipes' quantizer.
    """
    loaded = None
    if recipe is not None:
        from ..recipe import load_recipe

        loaded = load_recipe(recipe)
        if model is None:
            model, revision = loaded.model.id, loaded.model.revision
    if model is None:
        raise PlanError("plan: give a model or a recipe", field="model", hint="quantkit plan MODEL or --recipe RECIPE")
    config = load_config(model, revision)
    quantized = "quantization_config" in config
    calibrating = SHIPPED_4BIT if loaded is None else Calibrating.of_recipe(loaded, config)
    return plan_config(config, gpu, gpus=gpus, context=context, batch=batch, kv_cache_dtype=kv_cache_dtype,
                       gpu_memory_utilization=gpu_memory_utilization, group_size=group_size, model=model,
                       checkpoint_quantized=quantized, calibrating=calibrating)

