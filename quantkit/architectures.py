"""Where things live inside the decoder architectures quantkit supports.

Quantizers need to know which Linears share an input (their Hessians or activation
statistics are gathered once) and which op produces that input (AWQ and SmoothQuant fold
scales into it). The engine needs the names of the embedding, final norm and lm_head so it
can stream them like any layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ModelError


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same tensor, and the op whose output that tensor is."""

    linears: tuple[str, ...]
    producer: str
    producer_is_norm: bool


@dataclass(frozen=True)
class Architecture:
    name: str
    layers_prefix: str
    embed: str
    final_norm: str
    lm_head: str
    groups: tuple[InputGroup, ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)


_LLAMA_GROUPS = (
    InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", True),
    InputGroup(("self_attn.o_proj",), "self_attn.v_proj", False),
    InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", True),
    InputGroup(("mlp.down_proj",), "mlp.up_proj", False),
)


def _llama_like(name: str) -> Architecture:
    return Architecture(
        name=name,
        layers_prefix="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        groups=_LLAMA_GROUPS,
    )


ARCHITECTURES: dict[str, Architecture] = {
    n: _llama_like(n) for n in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
}


def architecture_for(config: dict[str, Any], where: str) -> Architecture:
    """The layout for a model's config.json, or an error listing what is supported."""
    names = config.get("architectures") or []
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    raise ModelError(
        f"{where}: unsupported architecture {', '.join(map(str, names)) or '(config.json names none)'}",
        field="architectures", value=names, hint=f"supported: {', '.join(sorted(ARCHITECTURES))}")


def can_fold_v_into_o(config: dict[str, Any]) -> bool:
    """v_proj's output rows map one-to-one onto o_proj's input columns only without GQA."""
    heads = config["num_attention_heads"]
    return config.get("num_key_value_heads", heads) == heads


def foldable(group: InputGroup, config: dict[str, Any]) -> bool:
    """Whether a per-channel scale on ``group``'s input can be folded exactly into its producer:
    a norm's weight, up_proj's output rows (down_proj reads ``act(gate) * up``, elementwise),
    or v_proj's output rows where there is no GQA."""
    if group.producer.endswith("v_proj"):
        return can_fold_v_into_o(config)
    return True
