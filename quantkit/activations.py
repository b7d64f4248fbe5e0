"""Activation quantization as vLLM's W8A8/FP8/NVFP4 kernels apply it, simulated in float.

The engine puts this in front of every Linear whose scheme quantizes its input, so that the
propagated hidden states and the reported perplexity include the activation error a server
will really see, not only the weight error.
"""

from __future__ import annotations

import torch
from torch import nn

from .grids import activation_divisor, effective_scale, round_to_grid, symmetric_scale
from .scheme import ActivationScheme, QuantizedWeight


def fake_quantize_activation(x: torch.Tensor, act: ActivationScheme, input_scale: torch.Tensor | None,
                             input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded as the kernel rounds it and mapped back to ``x``'s dtype: with scales
    per token, per token group or per tensor computed from ``x`` when dynamic (tensor-group
    scales rounded to E4M3 after multiplying by the static ``input_global_scale``), else with
    the static per-tensor ``input_scale``."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).to(torch.float32)
    layout, grid = act.layout, act.grid
    if act.dynamic:
        g = input_global_scale.to(xf.device) if act.has_global_scale else None
        scale = effective_scale(
            symmetric_scale(layout.amax(xf), activation_divisor(grid), act.scale_format, g), g)
    else:
        scale = input_scale.to(device=x.device, dtype=torch.float32)
    s = layout.expand(scale, *xf.shape)
    return (round_to_grid(xf / s, grid) * s).reshape(shape).to(x.dtype)


def attach_activation_quantizers(layer: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """From now on each quantized Linear of ``layer`` sees its input quantized."""
    for name, qw in quantized.items():
        act = qw.scheme.input_activations
        if act is None:
            continue
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, act=act, s=qw.input_scale, g=qw.input_global_scale:
                (fake_quantize_activation(args[0], act, s, g),) + args[1:])
