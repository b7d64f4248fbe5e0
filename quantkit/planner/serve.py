"""The ``vllm serve`` command line for a plan or for a checkpoint quantkit wrote."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..gpus import get_gpu
from .budget import KVCacheDtype, SchemePlan, plan_scheme
from .precision import PrecisionScheme, get_scheme
from .shape import ModelShape, check_tensor_parallel


def render_serve(model: str, shape: ModelShape, scheme: PrecisionScheme, row: SchemePlan | None, gpus: int,
                  context: int | None, kv_cache_dtype: str, util: float | None, checkpoint_quantized: bool) -> str:
    flags = []
    if scheme.name != "bf16" and not checkpoint_quantized:
        if scheme.quantization_flag:
            # vLLM quantizes a BF16 checkpoint to FP8 at load time; a quantkit FP8 export needs no flag.
            flags = ["--quantization", scheme.quantization_flag]
        else:
            model = quantized_output_name(model, scheme.name)
    parts = ["vllm", "serve", shlex.quote(model), *flags]
    parts += ["--dtype", shape.dtype]
    if kv_cache_dtype == "fp8":
        parts += ["--kv-cache-dtype", "fp8"]
    length = context if context is not None else (row.max_model_len if row is not None else None)
    if length:
        parts += ["--max-model-len", str(length)]
    if gpus > 1:
        parts += ["--tensor-parallel-size", str(gpus)]
    if util is not None:
        parts += ["--gpu-memory-utilization", f"{util:g}"]
    if row is not None and row.enforce_eager:
        parts.append("--enforce-eager")
    return " ".join(parts)


def quantized_output_name(model: str, scheme_name: str) -> str:
    """Where the plan assumes quantkit writes ``model`` quantized: ``./<name>-<scheme>``."""
    return f"./{Path(model.rstrip('/')).name}-{scheme_name}"


def serve_command(
    model_path_or_id: str,
    config: dict[str, Any],
    scheme_name: str,
    gpu: str | None = None,
    *,
    gpus: int = 1,
    context: int | None = None,
    batch: int = 1,
    kv_cache_dtype: KVCacheDtype = "auto",
    gpu_memory_utilization: float = 0.9,
) -> str:
    """The ``vllm serve`` line for a checkpoint quantkit wrote (for the model card).

    ``config`` is the checkpoint's config.json as a dict, ``scheme_name`` one of
    ``bf16, fp8, w8a8-int8, w4a16, w4a16-asym``. vLLM reads the scheme from the checkpoint's
    ``quantization_config`` (compressed-tensors, GPTQ and AWQ alike), so no
    ``--quantization`` flag is emitted. With ``gpu`` the line carries the longest
    ``--max-model-len`` that fits (or ``context``), ``--gpu-memory-utilization`` and, on
    tight boards, ``--enforce-eager``; it raises ``PlanError`` if the model does not fit.
    Without ``gpu`` only ``context`` (if given) sets ``--max-model-len``.

    >>> serve_command("org/llama-8b-w4a16", cfg, "w4a16", gpu="L40S")
    'vllm serve org/llama-8b-w4a16 --dtype bfloat16 --max-model-len 131072 --gpu-memory-utilization 0.9'
    """
    shape = ModelShape.from_config(config, where=f"{model_path_or_id}/config.json")
    scheme = get_scheme(scheme_name)
    row = None
    util = None
    if gpu is not None:
        device = get_gpu(gpu)
        row = plan_scheme(shape, scheme, device, gpus=gpus, context=context, batch=batch,
                          kv_cache_dtype=kv_cache_dtype, gpu_memory_utilization=gpu_memory_utilization)
        if not row.fits:
            raise PlanError(
                f"serve_command: {scheme.label} of {model_path_or_id} does not fit on {gpus} x {device.name} "
                f"(longest context {row.max_model_len} tokens)", field="gpu", value=device.name,
                hint="use more GPUs or a smaller scheme")
        util = gpu_memory_utilization
    else:
        check_tensor_parallel(shape, gpus)
    return render_serve(model_path_or_id, shape, scheme, row, gpus, context, kv_cache_dtype, util,
                         checkpoint_quantized=True)
