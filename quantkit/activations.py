"""Activation quantization as W8A8/FP8 kernels apply it, simulated in float.

The engine puts this in front of every Linear whose scheme quantizes its input, so that the
propagated hidden states and the reported perplexity include the activation error a server
will really see, not only the weight error.
"""

from __future__ import annotations

import torch
from torch import nn

from .scheme import FP8_DTYPE, FP8_MAX, ActivationScheme, QuantizedWeight


def fake_quantize_activation(x: torch.Tensor, act: ActivationScheme, input_scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` rounded as the kernel rounds it (per token when dynamic, else with the static
    per-tensor ``input_scale``) and mapped back to ``x``'s dtype."""
    xf = x.to(torch.float32)
    qmax = FP8_MAX if act.type == "float" else 2 ** (act.num_bits - 1) - 1
    if act.dynamic:
        dims = -1 if act.strategy == "token" else tuple(range(xf.dim()))
        scale = (xf.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(1e-12)
    else:
        scale = input_scale.to(device=x.device, dtype=torch.float32)
    if act.type == "float":
        q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32)
    else:
        q = torch.round(xf / scale).clamp(-qmax - 1, qmax)
    return (q * scale).to(x.dtype)


def attach_activation_quantizers(layer: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """From now on each quantized Linear of ``layer`` sees its input quantized."""
    for name, qw in quantized.items():
        act = qw.scheme.input_activations
        if act is None:
            continue
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, act=act, s=qw.input_scale: (fake_quantize_activation(args[0], act, s),) + args[1:])
