"""The attention of ``quantkit tune``'s student while it trains: sdpa on query, key and value in
the quantized Linears' products dtype (bf16 on a GPU) instead of the float32 stream's.

In float32 with grouped key/value heads and no mask, transformers asks sdpa for GQA, which no
fused float32 kernel gives, so PyTorch falls back to its math kernel: it keeps every head's
``[T, T]`` attention for the backward (10–12 float32 vectors of hidden + intermediate size a
layer a token against 6–8 in bf16, the head's share included, at Llama-3.1-8B shapes on an
H200; docs/quality.md, stop 45). In bf16 a fused kernel keeps only its inputs and output.
Its inputs are the bf16 products' outputs with RoPE applied and its output goes into
o_proj's bf16 product, so what is rounded on the way is little more than those products round.
Evaluation (``eval()``: the KL report, the perplexities) keeps the float32 attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "quantkit_tune_sdpa"


def training_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention, in bf16 while ``module`` trains."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training or query.dtype == torch.bfloat16:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(torch.bfloat16)
    out, weights = sdpa_attention_forward(module, query.to(torch.bfloat16), key.to(torch.bfloat16),
                                          value.to(torch.bfloat16), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def use_training_attention(model: nn.Module, products: torch.dtype) -> None:
    """``training_sdpa`` for ``model`` when its products are bf16 and it attends with sdpa
    (other implementations, and the CPU's float32 products, are left as they are)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if products != torch.bfloat16 or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, training_sdpa)
    # The masks sdpa takes (an implementation without its own gets none: padding ignored).
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
