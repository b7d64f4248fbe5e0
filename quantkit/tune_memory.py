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


# One step's activations and logits, fitted to tune's own peak at Llama-3.1-8B shapes on an H200
# (one window of 2048 tokens, base in bf16, docs/quality.md, stop 44): per token, this many
# float32 vectors of hidden + intermediate size in each decoder layer, and of the vocabulary's
# size for the logits. It gives the whole 32-layer model's measured 84.3 GiB. Short models hold
# less a layer (2 and 4 layers: 5.8 vectors fit both, and the estimate is 10–15% above them), so
# stop 43's extrapolation from those (61 GiB) was too low; the refusal errs on the safe side.
LAYER_VECTORS, VOCAB_VECTORS = 11.1, 8.3


def tune_bytes(parameters: int, quantized: int, groups: int, bits: int, base_itemsize: int, layers: int,
               width: int, vocab: int, tokens: int) -> int:
    """About the device memory tune holds for a model of ``parameters`` (``quantized`` of them in
    ``groups`` scale groups of ``bits``-bit codes; ``width``: hidden plus intermediate size) at
    ``tokens`` a step: the base in ``base_itemsize`` bytes a parameter, the quantized model as its
    codes with the rest in float32, each group's scale, θ and Adam's two moments, and one step's
    activations and logits."""
    held = (parameters * base_itemsize + quantized * steps_dtype(bits).itemsize + (parameters - quantized) * 4
            + groups * 16)
    return int(held + tokens * 4 * (layers * LAYER_VECTORS * width + VOCAB_VECTORS * vocab))
