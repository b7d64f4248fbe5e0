"""Memory planner: will this model, in this precision, serve on these GPUs with vLLM?

Everything here is arithmetic on config.json; no weight is read. The budget follows vLLM's
own accounting (v1 engine, ``gpu_worker.determine_available_memory``), per GPU:

    requested  = capacity * gpu_memory_utilization
    kv_budget  = requested - weights - activation_peak - non_torch
    max tokens = floor(kv_budget / (block_size * kv_bytes_per_token)) * block_size

``capacity`` is ``torch.cuda.mem_get_info()`` total (see ``quantkit.gpus``). The CUDA context
and the CUDA graphs vLLM captures after sizing the KV cache are *not* in ``requested``: they
must fit in the ``1 - gpu_memory_utilization`` headroom, which ``headroom_needed`` checks.
See ``activation_bytes`` for the activation assumption.

Linear shapes are those of the decoders quantkit supports (Llama, Mistral, Qwen2): q/k/v/o,
gate/up/down. Sliding-window savings (some Mistral configs) are not modelled: the figures
are then an upper bound.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ModelError, QuantkitError
from .gpus import GiB, GPU, get_gpu

log = logging.getLogger(__name__)

KVCacheDtype = Literal["auto", "fp8"]

BLOCK_SIZE = 16  # vLLM's default KV-cache block (tokens)
VOCAB_PADDING = 64  # vLLM pads embedding/lm_head rows to a multiple of this
DEFAULT_MIN_CONTEXT = 2048  # "fits" without --context means at least this (or the model max)
USEFUL_CONTEXT = 8192  # a recommendation prefers a scheme that serves this much (or model max)

# Activation allowance constants; see activation_bytes.
SAMPLER_BYTES_PER_LOGIT = 22  # bf16 logits 2 + fp32 copy 4 + sorted 4 + int64 index 8 + probs 4
NON_TORCH_BYTES = GiB // 4  # cuBLAS/cuBLASLt workspaces, allocator slack
NCCL_BYTES = GiB // 2  # NCCL and custom all-reduce buffers, tensor parallel only
CUDA_CONTEXT_BYTES = GiB // 2  # measured 0.51 GiB on H100 and H200 (cuMemGetInfo after cuCtxCreate)
CUDA_GRAPH_BYTES = GiB // 2  # vLLM logs 0.2-1 GiB "Graph capturing ... took" for 8B-70B


class PlanError(QuantkitError):
    """The plan request cannot be answered (bad tensor-parallel size, unknown scheme, ...)."""


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields the planner needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False  # q/k/v (and o for Llama) carry biases
    o_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "bfloat16"
    architecture: str = "unknown"
    # Mixture-of-Experts: experts per MoE layer, each one's intermediate size, a shared
    # expert's (0: none), and how many layers are MoE (the rest dense, e.g. DeepSeek's first 3).
    num_experts: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    moe_layers: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> "ModelShape":
        """Read the shape; a missing or malformed field raises ``ModelError`` naming it."""
        cfg = _text_config(config)

        def need(key: str) -> int:
            value = cfg.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"{where}: field '{key}' must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        arch = (cfg.get("architectures") or config.get("architectures") or ["unknown"])[0]
        qwen2 = arch.startswith("Qwen2")
        attn_bias = bool(cfg.get("attention_bias", False)) or qwen2
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        experts, moe_inter, shared, moe_layers = _experts(cfg, need("num_hidden_layers"), need("intermediate_size"))
        return cls(
            num_experts=experts,
            moe_intermediate_size=moe_inter,
            shared_intermediate_size=shared,
            moe_layers=moe_layers,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=need("vocab_size"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            max_position_embeddings=need("max_position_embeddings"),
            attention_bias=attn_bias,
            o_bias=attn_bias and not qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            dtype="float16" if dtype == "float16" else "bfloat16",
            architecture=arch,
        )


def _experts(cfg: dict[str, Any], layers: int, intermediate: int) -> tuple[int, int, int, int]:
    """(experts, expert intermediate size, shared-expert intermediate size, MoE layers) from
    the fields the MoE families use (Mixtral/gpt-oss ``num_local_experts``, Qwen ``num_experts``
    with ``decoder_sparse_step``/``mlp_only_layers``, DeepSeek ``n_routed_experts`` with
    ``first_k_dense_replace`` and ``n_shared_experts``); zeros for a dense model."""
    experts = next((v for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(v := cfg.get(k), int) and not isinstance(v, bool) and v > 1), 0)
    if not experts:
        return 0, 0, 0, 0
    moe_inter = cfg.get("moe_intermediate_size") or intermediate
    shared = cfg.get("shared_expert_intermediate_size") or (cfg.get("n_shared_experts") or 0) * moe_inter
    dense_first = cfg.get("first_k_dense_replace") or 0
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    moe_layers = sum(1 for i in range(layers) if i >= dense_first and i not in only_mlp and (i + 1) % step == 0)
    return experts, int(moe_inter), int(shared), moe_layers


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config with every default filled in by its transformers config
    class: a multimodal config.json nests it (``text_config``) and writes only the fields that
    differ from the defaults (Gemma 3's omits num_attention_heads, vocab_size, ...)."""
    raw = config.get("text_config", config) if "hidden_size" not in config else config
    try:
        from transformers import AutoConfig

        full = AutoConfig.for_model(**config).get_text_config(decoder=True).to_dict()
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw  # not a config transformers knows: read the fields as written
    return {**full, **{k: v for k, v in raw.items() if v is not None}}


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads each rank holds; with fewer KV heads than ranks each rank keeps a replica of one."""
    check_tensor_parallel(shape, tp)
    return shape.num_kv_heads // tp if tp <= shape.num_kv_heads else 1


def check_tensor_parallel(shape: ModelShape, tp: int) -> None:
    """vLLM's rules: heads divide evenly, KV heads split evenly or replicate evenly."""
    if tp < 1:
        raise PlanError(f"--gpus: must be at least 1, got {tp}")
    if shape.num_heads % tp:
        raise PlanError(
            f"--gpus {tp}: num_attention_heads={shape.num_heads} is not divisible by it; "
            f"use a divisor such as {_divisors(shape.num_heads)}"
        )
    kv = shape.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        raise PlanError(f"--gpus {tp}: num_key_value_heads={kv} neither splits nor replicates evenly")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in (1, 2, 4, 8) if n % d == 0)


@dataclass(frozen=True)
class LinearShape:
    """One Linear's weight on one rank: ``[out, in]``, ``count`` of them in the model."""

    name: str
    out_features: int
    in_features: int
    count: int


def linear_shapes(shape: ModelShape, tp: int = 1) -> list[LinearShape]:
    """Per-rank shapes of the decoder Linears (the ones a scheme quantizes)."""
    h, hd, n = shape.hidden_size, shape.head_dim, shape.num_layers
    q = shape.num_heads * hd // tp
    kv = kv_heads_per_gpu(shape, tp) * hd
    inter = math.ceil(shape.intermediate_size / tp)
    dense = n - shape.moe_layers
    out = [
        LinearShape("q_proj", q, h, n),
        LinearShape("k_proj", kv, h, n),
        LinearShape("v_proj", kv, h, n),
        LinearShape("o_proj", h, q, n),
        LinearShape("gate_proj", inter, h, dense),
        LinearShape("up_proj", inter, h, dense),
        LinearShape("down_proj", h, inter, dense),
    ]
    if shape.moe_layers:  # vLLM splits every expert's intermediate size across ranks
        e = math.ceil(shape.moe_intermediate_size / tp)
        count = shape.moe_layers * shape.num_experts
        out += [LinearShape("experts.gate_proj", e, h, count), LinearShape("experts.up_proj", e, h, count),
                LinearShape("experts.down_proj", h, e, count)]
        if shape.shared_intermediate_size:
            sh = math.ceil(shape.shared_intermediate_size / tp)
            out += [LinearShape("shared_expert.gate_proj", sh, h, shape.moe_layers),
                    LinearShape("shared_expert.up_proj", sh, h, shape.moe_layers),
                    LinearShape("shared_expert.down_proj", h, sh, shape.moe_layers)]
    return [ls for ls in out if ls.count]


def router_params(shape: ModelShape) -> int:
    """Router weights (``[experts, hidden]`` per MoE layer): kept in 16 bits, replicated."""
    return shape.moe_layers * shape.num_experts * shape.hidden_size


def padded_vocab_per_gpu(shape: ModelShape, tp: int = 1) -> int:
    """Embedding rows on one rank: vocab padded to a multiple of 64, then split."""
    padded = math.ceil(shape.vocab_size / VOCAB_PADDING) * VOCAB_PADDING
    return math.ceil(padded / tp)


def count_parameters(shape: ModelShape) -> int:
    """Parameters as in the checkpoint (no vocab padding, tied lm_head counted once)."""
    linear = sum(ls.out_features * ls.in_features * ls.count for ls in linear_shapes(shape))
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    return linear + embed + norms + _bias_params(shape, tp=1) + router_params(shape)


def _bias_params(shape: ModelShape, tp: int) -> int:
    hd, n = shape.head_dim, shape.num_layers
    total = 0
    if shape.attention_bias:
        total += (shape.num_heads // tp + 2 * kv_heads_per_gpu(shape, tp)) * hd * n
    if shape.o_bias:
        total += shape.hidden_size * n  # row-parallel bias is replicated
    if shape.mlp_bias:
        total += (2 * math.ceil(shape.intermediate_size / tp) + shape.hidden_size) * n
    return total


@dataclass(frozen=True)
class QuantizeMemory:
    """Device memory quantkit needs to GPTQ-quantize one decoder layer (its largest), bytes."""

    layer: int  # the layer's weights in 16 bits
    codes: int  # its codes (one byte per weight) held until the layer is saved
    hessians: int  # float32, one per input group (every expert's gate/up share one)
    solve: int  # GPTQ's working set: a stacked chunk, its errors, the inverse Hessian factor
    activations: int  # the calibration hidden states, 16 bits
    per_expert_hessians: int  # what one Hessian per expert Linear would take instead (routed calibration)

    @property
    def total(self) -> int:
        return self.layer + self.codes + self.hessians + self.solve + self.activations


def quantize_memory(shape: ModelShape, samples: int = 128, seq_len: int = 2048) -> QuantizeMemory:
    """The quantization-time need of the largest layer (a MoE layer when there is one), under
    all-expert calibration, which lets every expert's gate/up share one Hessian."""
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    attention = 2 * h * q + 2 * h * kv
    hess = h * h + q * q  # q/k/v share one; o_proj its own
    if shape.moe_layers:
        e, i, sh = shape.num_experts, shape.moe_intermediate_size, shape.shared_intermediate_size
        mlp = 3 * h * (e * i + sh)
        hess += h * h + e * i * i + sh * sh
        stacked = 2 * h * (e * i + sh)
        separate = 2 * e * h * h + e * i * i + sh * sh + h * h
        extra = e * h
    else:
        i = shape.intermediate_size
        mlp = 3 * h * i
        hess += h * h + i * i
        stacked = 2 * h * i
        separate = hess
        extra = 0
    params = attention + mlp
    chunk = min(stacked, 1 << 28)
    big = max(h, i, q)
    return QuantizeMemory(
        layer=2 * (params + extra),
        codes=params,
        hessians=4 * hess,
        solve=4 * (2 * chunk + 2 * big * big),
        activations=2 * samples * seq_len * h,
        per_expert_hessians=4 * (separate + q * q + h * h) if shape.moe_layers else 4 * hess,
    )


# --------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class PrecisionScheme:
    """How one precision stores a Linear in vLLM's memory (not necessarily on disk).

    Per ``[out, in]`` weight: ``out*in*weight_bits/8`` bytes of codes, plus scales of
    ``scale_bytes`` per output channel (``group_size`` None) or per group of ``group_size``
    inputs per output channel, plus packed 4-bit zero points when asymmetric.
    Embeddings, lm_head, norms and biases stay at 16 bits in every scheme.
    """

    name: str
    label: str
    weight_bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_bytes: int = 0
    activations: Literal["bf16", "fp8", "int8"] = "bf16"
    quantization_flag: str | None = None  # vLLM --quantization for online quantization of a BF16 checkpoint

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        if self.weight_bits >= 16:
            return out_features * in_features * 2
        codes = out_features * in_features * self.weight_bits // 8
        groups = 1 if self.group_size is None else math.ceil(in_features / self.group_size)
        scales = out_features * groups * self.scale_bytes
        zeros = 0 if self.symmetric else math.ceil(out_features * groups * self.weight_bits / 8)
        return codes + scales + zeros

    def runs_on(self, gpu: GPU) -> bool:
        """Whether the GPU has tensor cores for this scheme's activations."""
        return {"bf16": gpu.compute_capability >= (8, 0), "fp8": gpu.fp8, "int8": gpu.int8}[self.activations]


SCHEMES: dict[str, PrecisionScheme] = {
    s.name: s
    for s in (
        PrecisionScheme("bf16", "BF16", 16),
        # compressed-tensors FP8_DYNAMIC: fp8 weights, one fp32 scale per output channel.
        PrecisionScheme("fp8", "FP8 W8A8", 8, scale_bytes=4, activations="fp8", quantization_flag="fp8"),
        # compressed-tensors W8A8 INT8: int8 weights, fp32 per-channel scale, dynamic per-token acts.
        PrecisionScheme("w8a8-int8", "INT8 W8A8", 8, scale_bytes=4, activations="int8"),
        # GPTQ / compressed-tensors pack-quantized: int4 packed in int32, 16-bit group scales.
        PrecisionScheme("w4a16", "W4A16 g128 sym (GPTQ)", 4, group_size=128, scale_bytes=2),
        # AWQ: as above plus packed 4-bit zero points per group.
        PrecisionScheme("w4a16-asym", "W4A16 g128 asym (AWQ)", 4, group_size=128, symmetric=False, scale_bytes=2),
    )
}

# Most accurate first; the recommendation takes the first that serves a useful context.
PREFERENCE = ("bf16", "fp8", "w8a8-int8", "w4a16")


def get_scheme(name: str, group_size: int | None = None) -> PrecisionScheme:
    """A scheme by name; ``group_size`` overrides the W4A16 group (e.g. 64 or 32)."""
    key = name.lower().replace("_", "-")
    aliases = {"int8": "w8a8-int8", "w8a8": "w8a8-int8", "fp8-dynamic": "fp8", "gptq": "w4a16", "awq": "w4a16-asym"}
    key = aliases.get(key, key)
    if key not in SCHEMES:
        raise PlanError(f"scheme: unknown {name!r}; known: {', '.join(SCHEMES)}")
    scheme = SCHEMES[key]
    if group_size is not None and scheme.group_size is not None and group_size != scheme.group_size:
        if group_size <= 0:
            raise PlanError(f"--group-size: must be positive, got {group_size}")
        label = scheme.label.replace(f"g{scheme.group_size}", f"g{group_size}")
        scheme = PrecisionScheme(**{**asdict(scheme), "group_size": group_size, "label": label})
    return scheme


# --------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights on one GPU: quantized Linears (codes + scales + zeros) and the rest."""

    linears: int
    unquantized: int  # embeddings, lm_head (unless tied), norms, biases, at 16 bits

    @property
    def total(self) -> int:
        return self.linears + self.unquantized


def weight_bytes(shape: ModelShape, scheme: PrecisionScheme, tp: int = 1) -> WeightBytes:
    """Weight memory of one rank under tensor parallelism ``tp``.

    Column-parallel (q/k/v/gate/up) split outputs, row-parallel (o/down) split inputs, so
    groups of a W4A16 row-parallel Linear split too. KV heads fewer than ``tp`` replicate
    k/v_proj. Embedding and lm_head are vocab-parallel (padded to 64 rows); norms replicate.
    """
    linears = sum(scheme.linear_bytes(ls.out_features, ls.in_features) * ls.count for ls in linear_shapes(shape, tp))
    vocab = padded_vocab_per_gpu(shape, tp)
    embed = vocab * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    return WeightBytes(linears, 2 * (embed + norms + _bias_params(shape, tp) + router_params(shape)))


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: KVCacheDtype = "auto", tp: int = 1) -> int:
    """KV-cache bytes per token on one rank: layers x kv_heads x head_dim x 2 (K and V) x dtype.

    ``auto`` keeps the model dtype (2 bytes); ``fp8`` is 1 byte. With ``tp`` larger than the
    number of KV heads each rank stores one replicated head, so the total over ranks grows.
    """
    dtype_bytes = {"auto": 2, "fp8": 1}.get(kv_cache_dtype)
    if dtype_bytes is None:
        raise PlanError(f"--kv-cache-dtype: expected auto or fp8, got {kv_cache_dtype!r}")
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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SchemePlan:
    """One precision on the requested GPUs; byte figures are per GPU unless named total."""

    scheme: str
    label: str
    native: bool  # the GPU has tensor cores for this scheme's activations
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


@dataclass
class PlanResult:
    """A plan for one model on one GPU type: a row per precision and a recommendation.

    In a notebook it renders as a table; ``to_json()`` gives every figure in bytes.
    """

    model: str
    architecture: str
    parameters: int
    max_position_embeddings: int
    gpu: str
    gpu_memory_bytes: int
    gpus: int
    batch: int
    context: int | None  # as asked; None means "as long as fits"
    required_context: int
    kv_cache_dtype: str
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_num_seqs: int
    rows: list[SchemePlan]
    recommended: str | None
    serve_command: str | None
    notes: list[str] = field(default_factory=list)
    quantize_memory: QuantizeMemory | None = None  # GPTQ at 128 x 2048 calibration tokens, one layer
    experts: int = 0  # experts per MoE layer (0: dense)
    moe_layers: int = 0

    def row(self, scheme: str) -> SchemePlan:
        for r in self.rows:
            if r.scheme == scheme:
                return r
        raise KeyError(scheme)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        from .plan_cli import format_plan_table

        return format_plan_table(self)

    def __str__(self) -> str:
        return self.to_table()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.to_table())

    def _repr_markdown_(self) -> str:
        return "```\n" + self.to_table() + "\n```"


# --------------------------------------------------------------------------- planning


def load_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of a local folder (or the file itself), else of a hub repo id.

    Only config.json is fetched from the Hub (``hf_hub_download``); nothing else is read.
    Built-in models (``builtin:smollm2-135m``) are resolved to their converted folder.
    """
    if model.startswith("builtin:"):
        from .assets import builtin_model_dir

        model = str(builtin_model_dir(model))
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelError(f"{path}: no config.json in this folder")
    elif not path.is_file():
        if model.startswith((".", "/", "~")) or model.count("/") > 1:
            raise ModelError(f"model: {model} is not a folder with config.json")
        path = _download_config(model, revision)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return config


def _download_config(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelError(
            f"model: cannot get config.json of '{repo_id}' (not a local folder; Hub said "
            f"{type(e).__name__}); check the path, the id, or your network/HF_TOKEN"
        ) from None


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
    _check_request(batch, context, gpu_memory_utilization)
    w = weight_bytes(shape, scheme, gpus)
    kv_tok = kv_bytes_per_token(shape, kv_cache_dtype, gpus)
    act = activation_bytes(shape, engine_defaults(gpu), gpus)
    budget = int(gpu.memory_bytes * gpu_memory_utilization)
    kv_budget = budget - w.total - act
    cap = shape.max_position_embeddings
    longest = max_model_len(kv_budget, kv_tok, batch, cap)
    required = _required_context(shape, context)
    needed = batch * math.ceil(required / BLOCK_SIZE) * BLOCK_SIZE * kv_tok
    headroom = gpu.memory_bytes - budget
    eager = headroom < headroom_needed(False)
    fits = longest >= required and headroom >= headroom_needed(True)
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


def _required_context(shape: ModelShape, context: int | None) -> int:
    return context if context is not None else min(DEFAULT_MIN_CONTEXT, shape.max_position_embeddings)


def _check_request(batch: int, context: int | None, util: float) -> None:
    if batch < 1:
        raise PlanError(f"--batch: must be at least 1, got {batch}")
    if context is not None and context < 1:
        raise PlanError(f"--context: must be at least 1, got {context}")
    if not 0 < util <= 1:
        raise PlanError(f"--gpu-memory-utilization: must be in (0, 1], got {util}")


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
) -> PlanResult:
    """``plan_model`` for a config dict already in hand (``model`` only names it in output)."""
    shape = ModelShape.from_config(config, where=f"{model}/config.json")
    device = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    _check_request(batch, context, gpu_memory_utilization)
    check_tensor_parallel(shape, gpus)
    kwargs = dict(gpus=gpus, context=context, batch=batch, kv_cache_dtype=kv_cache_dtype,
                  gpu_memory_utilization=gpu_memory_utilization)
    rows = [plan_scheme(shape, get_scheme(n, group_size), device, **kwargs) for n in SCHEMES]
    best = recommend(rows, shape, context)
    notes = _notes(shape, device, rows, best, {**kwargs, "model": model, "checkpoint_quantized": checkpoint_quantized})
    command = None
    if best is not None:
        chosen = next(r for r in rows if r.scheme == best)
        command = _render_serve(model, shape, SCHEMES[best], chosen, gpus, context, kv_cache_dtype,
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
        required_context=_required_context(shape, context),
        kv_cache_dtype=kv_cache_dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=defaults.max_num_batched_tokens,
        max_num_seqs=defaults.max_num_seqs,
        rows=rows,
        recommended=best,
        serve_command=command,
        notes=notes,
        quantize_memory=quantize_memory(shape),
        experts=shape.num_experts,
        moe_layers=shape.moe_layers,
    )


def plan_model(
    model: str,
    gpu: str = "H100-80GB",
    gpus: int = 1,
    context: int | None = None,
    batch: int = 1,
    kv_cache_dtype: KVCacheDtype = "auto",
    gpu_memory_utilization: float = 0.9,
    group_size: int | None = None,
    revision: str | None = None,
) -> PlanResult:
    """Plan serving ``model`` (local folder or hub id; only config.json is read) with vLLM.

    >>> result = plan_model("meta-llama/Llama-3.1-70B-Instruct", gpu="H100-80GB", gpus=2)
    >>> result.recommended, result.row("bf16").max_model_len
    >>> print(result.serve_command)

    ``context`` is the max_model_len you need (None: as long as fits), ``batch`` how many
    sequences of that length must be in the KV cache at once.
    """
    config = load_config(model, revision)
    quantized = "quantization_config" in config
    return plan_config(config, gpu, gpus=gpus, context=context, batch=batch, kv_cache_dtype=kv_cache_dtype,
                       gpu_memory_utilization=gpu_memory_utilization, group_size=group_size, model=model,
                       checkpoint_quantized=quantized)


def _notes(shape: ModelShape, gpu: GPU, rows: list[SchemePlan], best: str | None,
           request: dict[str, Any]) -> list[str]:
    notes = []
    gpus = request["gpus"]
    if gpus > shape.num_kv_heads:
        notes.append(f"{shape.num_kv_heads} KV heads on {gpus} GPUs: each GPU holds a replica of one KV head, "
                     f"so the KV cache totals {gpus // shape.num_kv_heads}x its size on one GPU")
    if not gpu.fp8:
        cc = ".".join(map(str, gpu.compute_capability))
        notes.append(f"{gpu.name} (compute capability {cc}) has no FP8 tensor cores: vLLM runs FP8 "
                     "checkpoints weight-only there, so FP8 is not recommended")
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
        notes.append(f"nothing fits on {gpus} x {gpu.name}; {_more_gpus_hint(shape, gpu, request)}")
    return notes


def _more_gpus_hint(shape: ModelShape, gpu: GPU, request: dict[str, Any]) -> str:
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


# --------------------------------------------------------------------------- vllm serve


def _render_serve(model: str, shape: ModelShape, scheme: PrecisionScheme, row: SchemePlan | None, gpus: int,
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
                f"(longest context {row.max_model_len} tokens); use more GPUs or a smaller scheme"
            )
        util = gpu_memory_utilization
    else:
        check_tensor_parallel(shape, gpus)
    return _render_serve(model_path_or_id, shape, scheme, row, gpus, context, kv_cache_dtype, util,
                         checkpoint_quantized=True)
