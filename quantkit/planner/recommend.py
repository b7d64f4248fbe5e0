"""Which precision to serve, and the notes that explain the choice."""

from __future__ import annotations

from typing import Any

from ..errors import PlanError
from ..gpus import GPU
from .budget import SchemePlan, plan_scheme
from .precision import SCHEMES
from .serve import quantized_output_name
from .shape import ModelShape, check_tensor_parallel

USEFUL_CONTEXT = 8192  # a recommendation prefers a scheme that serves this much (or model max)
# Most accurate first; the recommendation takes the first that serves a useful context. FP8
# block (per-block weights, per-128 token groups) measured closer to BF16 than per-channel FP8
# (docs/schemes.md); NVFP4 is the 4-bit choice where it is native (Blackwell's FP4 tensor cores).
PREFERENCE = ("bf16", "fp8-block", "fp8", "w8a8-int8", "nvfp4", "w4a16")


def recommend(rows: list[SchemePlan], shape: ModelShape, context: int | None) -> str | None:
    """BF16 if it serves a useful context, else FP8 (native GPUs only), INT8 W8A8, W4A16.

    Useful means the asked ``context``, or 8192 tokens (or the model's maximum if smaller).
    If none serves that, the most accurate scheme that merely fits; None if nothing fits.
    """
    useful = context if context is not None else min(USEFUL_CONTEXT, shape.max_position_embeddings)
    by_name = {r.scheme: r for r in rows}
    candidates = [by_name[n] for n in PREFERENCE if n in by_name and (n == "bf16" or by_name[n].native)]
    for r in candidates:
        if r.fits and r.max_model_len >= useful:
            return r.scheme
    for r in candidates:
        if r.fits:
            return r.scheme
    return None



def plan_notes(shape: ModelShape, gpu: GPU, rows: list[SchemePlan], best: str | None,
           request: dict[str, Any]) -> list[str]:
    notes = []
    gpus = request["gpus"]
    if gpus > shape.num_kv_heads:
        notes.append(f"{shape.num_kv_heads} KV heads on {gpus} GPUs: each GPU holds a replica of one KV head, "
                     f"so the KV cache totals {gpus // shape.num_kv_heads}x its size on one GPU")
    cc = ".".join(map(str, gpu.compute_capability))
    if not gpu.fp8:
        notes.append(f"{gpu.name} (compute capability {cc}) has no FP8 tensor cores: vLLM runs FP8 "
                     "checkpoints weight-only there, so FP8 is not recommended")
    fallbacks = [f"{s.label} through {s.fallback}" for s in (SCHEMES[r.scheme] for r in rows)
                 if s.fallback and not s.runs_on(gpu) and s.served_on(gpu) and s.activations != "fp8"]
    if fallbacks:
        notes.append(f"no native kernel on {gpu.name} (compute capability {cc}); vLLM serves "
                     f"{'; '.join(fallbacks)}")
    unserved = [s.label for s in (SCHEMES[r.scheme] for r in rows) if not s.served_on(gpu)]
    if unserved:
        notes.append(f"vLLM has no kernel for {', '.join(unserved)} on {gpu.name}: shown, never 'fits' "
                     "(W4AFP8 needs Hopper, capability 9.0)")
    if request.get("checkpoint_quantized"):
        notes.append("config.json has a quantization_config: this checkpoint is already quantized; "
                     "the rows show what each precision of its base model takes")
    elif best is not None and SCHEMES[best].quantization_flag is None and best != "bf16":
        notes.append(f"quantize to {SCHEMES[best].label} with quantkit first; the command serves its output "
                     f"folder, named here {quantized_output_name(request['model'], best)}")
    elif best == "fp8":
        notes.append("the command has vLLM quantize to FP8 at load; a quantkit FP8 export needs no --quantization")
    if best is not None and next(r for r in rows if r.scheme == best).enforce_eager:
        notes.append("the headroom left by --gpu-memory-utilization holds the CUDA context but not CUDA graphs: "
                     "the command adds --enforce-eager (or lower --gpu-memory-utilization)")
    if best is None:
        notes.append(f"nothing fits on {gpus} x {gpu.name}; {more_gpus_hint(shape, gpu, request)}")
    return notes


def more_gpus_hint(shape: ModelShape, gpu: GPU, request: dict[str, Any]) -> str:
    for n in (2, 4, 8):
        if n <= request["gpus"]:
            continue
        try:
            check_tensor_parallel(shape, n)
        except PlanError:
            continue
        for name in ("bf16", "w4a16"):
            asked = {k: request[k] for k in ("context", "batch", "kv_cache_dtype", "gpu_memory_utilization")}
            r = plan_scheme(shape, SCHEMES[name], gpu, gpus=n, **asked)
            if r.fits:
                return f"try --gpus {n} ({SCHEMES[name].label} serves {r.max_model_len} tokens)"
    return "try W4A16 with a shorter --context, or a larger GPU"

