"""The model's shape as the planner needs it: config.json fields, per-rank Linear shapes,
tensor-parallel rules and parameter counts.

Linear shapes are those of the decoders quantkit supports (Llama, Mistral, Qwen2): q/k/v/o,
gate/up/down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, PlanError

VOCAB_PADDING = 64  # vLLM pads embedding/lm_head rows to a multiple of this


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
                raise ModelError(f"{where}: field '{key}' must be a positive integer, got {value!r}", field=key,
                                 value=value, file=where)
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
    except Exception:  # transformers' config classes raise many types; validation names the field later
        return raw
    return {**full, **{k: v for k, v in raw.items() if v is not None}}


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads each rank holds; with fewer KV heads than ranks each rank keeps a replica of one."""
    check_tensor_parallel(shape, tp)
    return shape.num_kv_heads // tp if tp <= shape.num_kv_heads else 1


def check_tensor_parallel(shape: ModelShape, tp: int) -> None:
    """vLLM's rules: heads divide evenly, KV heads split evenly or replicate evenly."""
    if tp < 1:
        raise PlanError(f"--gpus: must be at least 1, got {tp}", field="--gpus", value=tp)
    if shape.num_heads % tp:
        raise PlanError(f"--gpus {tp}: num_attention_heads={shape.num_heads} is not divisible by it", field="--gpus",
                        value=tp, hint=f"use a divisor such as {_divisors(shape.num_heads)}")
    kv = shape.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        raise PlanError(f"--gpus {tp}: num_key_value_heads={kv} neither splits nor replicates evenly",
                        field="--gpus", value=tp)


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
    return linear + embed + norms + bias_params(shape, tp=1) + router_params(shape)


def bias_params(shape: ModelShape, tp: int) -> int:
    hd, n = shape.head_dim, shape.num_layers
    total = 0
    if shape.attention_bias:
        total += (shape.num_heads // tp + 2 * kv_heads_per_gpu(shape, tp)) * hd * n
    if shape.o_bias:
        total += shape.hidden_size * n  # row-parallel bias is replicated
    if shape.mlp_bias:
        total += (2 * math.ceil(shape.intermediate_size / tp) + shape.hidden_size) * n
    return total

