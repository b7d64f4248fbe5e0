"""What ``quantkit tune`` holds on its device, apart from the tuning so that the plan can size it
before a run without importing the tuning (which imports the evaluation, which imports the plan):
the dtypes of the codes and of the base, and about how many bytes in all."""

from __future__ import annotations

import torch


def steps_dtype(bits: int) -> torch.dtype:
    """The narrowest integer dtype that holds ``bits``-bit codes less their zero points, which lie
    in [−(2^bits − 1), 2^bits − 1]: int8 up to 7 bits, int16 at 8."""
    return torch.int8 if 2 ** bits - 1 <= torch.iinfo(torch.int8).max else torch.int16


def teacher_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype tune holds the base model in: bf16 on a GPU when the base is stored so, which
    saves 2 bytes a parameter (15 GiB at Llama-3.1-8B shapes) for the same quality (ten SmolLM2
    draws, docs/quality.md, stop 43); float32 otherwise, where bf16 arithmetic is slow (CPUs) or
    would round the stored weights."""
    return torch.bfloat16 if device.type == "cuda" and stored == torch.bfloat16 else torch.float32


def products_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the quantized Linears' products in tune's steps: bf16 on a GPU, which took
    the 32 steps from 20.1 to 16.4 s against TF32 at Llama-3.1-8B shapes on an H200, within the
    draws' noise on SmolLM2 (docs/quality.md, stop 44); float32 on the CPU and on GPUs without
    bf16 tensor cores (before Ampere), where bf16 products are slower. The stream between them,
    the head and the KL stay float32."""
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float32


# One step's activations and logits, fitted to tune's own peaks at Llama-3.1-8B shapes on an H200
# (one window of 2048 tokens, base in bf16): per token, this many float32 vectors of hidden +
# intermediate size in each decoder layer, by the products' dtype, and of the vocabulary's size
# for the logits. With bf16 products the attention trains in bf16 too (``tune_attention``) and
# the whole 32 layers held 66.6 GiB (stop 45; 7.2 gives 66.6 and is 10% above the 2 layers'
# 15.7); in float32, sdpa's math kernel keeps each head's [T, T] weights and they held 86.1
# (stop 44; 11.1 gives 84.3). Stop 43 had extrapolated from 2 and 4 layers to 61 GiB: the short
# models' peak is mostly the logits, so they do not pin the layers' share.
LAYER_VECTORS = {torch.bfloat16: 7.2, torch.float32: 11.1}
VOCAB_VECTORS = 8.3


def tune_bytes(parameters: int, quantized: int, groups: int, bits: int, base_itemsize: int, layers: int,
               width: int, vocab: int, tokens: int, products: torch.dtype) -> int:
    """About the device memory tune holds for a model of ``parameters`` (``quantized`` of them in
    ``groups`` scale groups of ``bits``-bit codes; ``width``: hidden plus intermediate size) at
    ``tokens`` a step with its products in ``products`` (``products_dtype``): the base in
    ``base_itemsize`` bytes a parameter, the quantized model as its codes with the rest in float32,
    each group's scale, θ and Adam's two moments, and one step's activations and logits."""
    held = (parameters * base_itemsize + quantized * steps_dtype(bits).itemsize + (parameters - quantized) * 4
            + groups * 16)
    return int(held + tokens * 4 * (layers * LAYER_VECTORS[products] * width + VOCAB_VECTORS * vocab))
