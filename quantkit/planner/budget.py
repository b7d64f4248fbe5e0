"""vLLM's memory budget on one GPU: KV cache per token, activation peak, headroom, and the
longest context that fits for one precision.

The budget follows vLLM's own accounting (v1 engine, ``gpu_worker.determine_available_memory``),
per GPU:

    requested  = capacity * gpu_memory_utilization
    kv_budget  = requested - weights - activation_peak - non_torch
    max tokens = floor(kv_budget / (block_size * kv_bytes_per_token)) * block_size

``capacity`` is ``torch.cuda.mem_get_info()`` total (see ``quantkit.gpus``). The CUDA context
and the CUDA graphs vLLM captures after sizing the KV cache are *not* in ``requested``: they
must fit in the ``1 - gpu_memory_utilization`` headroom, which ``headroom_needed`` checks.
See ``activation_bytes`` for the activation assumption. Sliding-window savings (some Mistral
configs) are not modelled: the figures are then an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import PlanError
from ..gpus import GPU, GiB
from .precision import PrecisionScheme, weight_bytes
from .shape import ModelShape, kv_heads_per_gpu

KVCacheDtype = Literal["auto", "fp8"]

BLOCK_SIZE = 16  # vLLM's default KV-cache block (tokens)
DEFAULT_MIN_CONTEXT = 2048  # "fits" without --context means at least this (or the model max)

# Activation allowance constants; see activation_bytes.
SAMPLER_BYTES_PER_LOGIT = 22  # bf16 logits 2 + fp32 copy 4 + sorted 4 + int64 index 8 + probs 4
NON_TORCH_BYTES = GiB // 4  # cuBLAS/cuBLASLt workspaces, allocator slack
NCCL_BYTES = GiB // 2  # NCCL and custom all-reduce buffers, tensor parallel only
CUDA_CONTEXT_BYTES = GiB // 2  # measured 0.51 GiB on H100 and H200 (cuMemGetInfo after cuCtxCreate)
CUDA_GRAPH_BYTES = GiB // 2  # vLLM logs 0.2-1 GiB "Graph capturing ... took" for 8B-70B


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: KVCacheDtype = "auto", tp: int = 1) -> int:
    """KV-cache bytes per token on one rank: layers x kv_heads x head_dim x 2 (K and V) x dtype.

    ``auto`` keeps the model dtype (2 bytes); ``fp8`` is 1 byte. With ``tp`` larger than the
    number of KV heads each rank stores one replicated head, so the total over ranks grows.
    """
    dtype_bytes = {"auto": 2, "fp8": 1}.get(kv_cache_dtype)
    if dtype_bytes is None:
        raise PlanError(f"--kv-cache-dtype: expected auto or fp8, got {kv_cache_dtype!r}", field="--kv-cache-dtype",
                        value=kv_cache_dtype)
    return shape.num_layers * kv_heads_per_gpu(shape, tp) * shape.head_dim * 2 * dtype_bytes


@dataclass(frozen=True)
class EngineDefaults:
    """vLLM's scheduler defaults for ``vllm serve`` (v1 engine, ``EngineArgs._set_default_args``)."""

    max_num_batched_tokens: int
    max_num_seqs: int


def engine_defaults(gpu: GPU) -> EngineDefaults:
    """8192 tokens / 1024 sequences on boards of 70 GiB or more except A100, else 2048 / 256."""
    if gpu.memory_bytes >= 70 * GiB and not gpu.name.upper().startswith("A100"):
        return EngineDefaults(8192, 1024)
    return EngineDefaults(2048, 256)


def activation_bytes(shape: ModelShape, defaults: EngineDefaults, tp: int = 1) -> int:
    """Allowance for vLLM's profile-run peak plus non-torch memory, on one rank.

    vLLM sizes the KV cache after a dummy forward of ``max_num_batched_tokens`` tokens (T)
    followed by a dummy sampling of ``max_num_seqs`` rows (S); the larger peak is reserved.
    Assumption, bf16 activations:
      - forward: the MLP is the peak: residual and normed input (2 x hidden), gate_up output
        (2 x intermediate/tp) and the SiLU-and-mul output (intermediate/tp) alive at once:
        ``T * (2*hidden + 3*intermediate/tp) * 2`` bytes;
      - sampler: ``S * vocab * 22`` bytes (bf16 logits, fp32 copy, sorted values, int64 sort
        indices, probabilities for top-k/top-p);
      - plus 0.25 GiB non-torch (cuBLAS workspaces), plus 0.5 GiB NCCL buffers when tp > 1.
    It errs high: vLLM's own log ("PyTorch activation peak memory takes ...") is the truth.
    """
    inter = math.ceil(shape.intermediate_size / tp)
    forward = defaults.max_num_batched_tokens * (2 * shape.hidden_size + 3 * inter) * 2
    sampler = defaults.max_num_seqs * shape.vocab_size * SAMPLER_BYTES_PER_LOGIT
    return max(forward, sampler) + NON_TORCH_BYTES + (NCCL_BYTES if tp > 1 else 0)


def headroom_needed(enforce_eager: bool = False) -> int:
    """Memory outside vLLM's budget: the CUDA context, plus CUDA graphs unless eager."""
    return CUDA_CONTEXT_BYTES + (0 if enforce_eager else CUDA_GRAPH_BYTES)


def max_model_len(kv_budget: int, kv_per_token: int, batch: int, cap: int) -> int:
    """Longest sequence of which ``batch`` fit at once in whole 16-token blocks, capped at ``cap``."""
    if kv_budget <= 0:
        return 0
    blocks = kv_budget // (kv_per_token * BLOCK_SIZE)
    return min(blocks // batch * BLOCK_SIZE, cap)



@dataclass(frozen=True)
class SchemePlan:
    """One precision on the requested GPUs; byte figures are per GPU unless named total."""

    scheme: str
    label: str
    native: bool  # vLLM has a native kernel for this scheme on the GPU (tensor cores for its activations)
    weight_bytes: int
    unquantized_bytes: int
    weight_bytes_total: int  # summed over ranks (replicas included)
    kv_bytes_per_token: int
    activation_bytes: int
    budget_bytes: int  # capacity x gpu_memory_utilization
    kv_budget_bytes: int
    kv_bytes_needed: int  # for batch x required context
    total_bytes: int  # weights + activation + KV for the required context
    max_model_len: int
    fits: bool
    enforce_eager: bool  # CUDA graphs do not fit in the headroom

    @property
    def max_tokens(self) -> int:
        return max_model_len(self.kv_budget_bytes, self.kv_bytes_per_token, 1, 2**62)



def plan_scheme(
    shape: ModelShape,
    scheme: PrecisionScheme,
    gpu: GPU,
    *,
    gpus: int = 1,
    context: int | None = None,
    batch: int = 1,
    kv_cache_dtype: KVCacheDtype = "auto",
    gpu_memory_utilization: float = 0.9,
) -> SchemePlan:
    """The memory account of one precision on ``gpus`` GPUs of one type (tensor parallel)."""
    check_request(batch, context, gpu_memory_utilization)
    w = weight_bytes(shape, scheme, gpus)
    kv_tok = kv_bytes_per_token(shape, kv_cache_dtype, gpus)
    act = activation_bytes(shape, engine_defaults(gpu), gpus)
    budget = int(gpu.memory_bytes * gpu_memory_utilization)
    kv_budget = budget - w.total - act
    cap = shape.max_position_embeddings
    longest = max_model_len(kv_budget, kv_tok, batch, cap)
    required = required_context(shape, context)
    needed = batch * math.ceil(required / BLOCK_SIZE) * BLOCK_SIZE * kv_tok
    headroom = gpu.memory_bytes - budget
    eager = headroom < headroom_needed(False)
    fits = longest >= required and headroom >= headroom_needed(True) and scheme.served_on(gpu)
    return SchemePlan(
        scheme=scheme.name,
        label=scheme.label,
        native=scheme.runs_on(gpu),
        weight_bytes=w.total,
        unquantized_bytes=w.unquantized,
        weight_bytes_total=w.total * gpus,
        kv_bytes_per_token=kv_tok,
        activation_bytes=act,
        budget_bytes=budget,
        kv_budget_bytes=kv_budget,
        kv_bytes_needed=needed,
        total_bytes=w.total + act + needed,
        max_model_len=longest,
        fits=fits,
        enforce_eager=eager,
    )


def required_context(shape: ModelShape, context: int | None) -> int:
    return context if context is not None else min(DEFAULT_MIN_CONTEXT, shape.max_position_embeddings)


def check_request(batch: int, context: int | None, util: float) -> None:
    if batch < 1:
        raise PlanError(f"--batch: must be at least 1, got {batch}", field="--batch", value=batch)
    if context is not None and context < 1:
        raise PlanError(f"--context: must be at least 1, got {context}", field="--context", value=context)
    if not 0 < util <= 1:
        raise PlanError(f"--gpu-memory-utilization: must be in (0, 1], got {util}", field="--gpu-memory-utilization",
                        value=util)

