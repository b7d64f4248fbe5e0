"""Llama 4: vLLM reorders the rows of q_proj and k_proj on load, and only some of their tensors.

vLLM's ``Llama4ForCausalLM.permute_qk_weight_for_rotary`` (vllm/model_executor/models/llama4.py)
turns the checkpoint's interleaved rotary pairs into the neox layout its rotary embedding uses,
by permuting the rows of each q_proj/k_proj tensor named ``weight``, ``weight_packed`` or
``weight_scale`` (of more than one element). Every other tensor indexed by those rows keeps the
checkpoint's order: compressed-tensors' ``weight_zero_point`` (asymmetric schemes), the GPTQ and
AWQ formats' ``qweight``/``qzeros``/``scales`` (``[in, out]``, never permuted), and block scales,
whose rows are blocks, not heads' rows. Such a checkpoint loads and serves wrong attention, so
it is refused before any weight is read.
"""

from __future__ import annotations

from .errors import RecipeError
from .scheme import Scheme

# Text model types whose q/k rows vLLM permutes on load.
PERMUTED = frozenset({"llama4_text"})
_QK = ("self_attn.q_proj", "self_attn.k_proj")


def check_qk_rows(model_type: str, linear_schemes: dict[str, Scheme], format_name: str, where: str) -> None:
    """RecipeError naming the first q/k projection whose tensors vLLM would not reorder."""
    if model_type not in PERMUTED:
        return
    for name, scheme in linear_schemes.items():
        if not name.endswith(_QK):
            continue
        # vLLM fuses q, k and v into one matrix of one scheme: leaving q/k in float takes v along.
        in_float = r"leave the attention's q/k/v in float (quantization.ignore: 're:.*self_attn\.[qkv]_proj$')"
        if format_name != "compressed-tensors":
            field, value, why = "export.format", format_name, f"the {format_name} format's qweight/qzeros/scales"
            hint = "use export.format: compressed-tensors"
        elif not scheme.weights.symmetric:
            field, value, why = "quantization.symmetric", False, "its weight_zero_point (asymmetric weights)"
            hint = f"use symmetric weights or {in_float}"
        elif scheme.weights.strategy == "block":
            field, value, why = "quantization.scheme", scheme.weights.block_size, "its block scales"
            hint = f"use another strategy or {in_float}"
        else:
            continue
        raise RecipeError(
            f"{where}: {name}: vLLM reorders Llama 4's q/k rows on load "
            f"(Llama4ForCausalLM.permute_qk_weight_for_rotary) but not {why}: the checkpoint would load "
            "and serve wrong attention", field=field, value=value, hint=hint)
