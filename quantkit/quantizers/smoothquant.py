"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

For Linears reading one normalised tensor, ``s_j = max|X_j|^α / max|W_j|^(1-α)`` per input
channel; dividing the norm's weight by ``s`` and multiplying the Linears' columns by ``s``
leaves the float layer's output unchanged while flattening the activations. As in the paper
only norm producers are smoothed (input_layernorm → q/k/v, post_attention_layernorm →
gate/up): those are the inputs an int8 activation quantizer sees with outliers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..architectures import Architecture

_FLOOR = 1e-5


class ChannelAbsMax:
    """Running per-input-channel ``max |x|`` over every calibration token (no host sync)."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=0).to(torch.float32)
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)


def smoothing_scales(act_amax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max_i max|W_i[:, j]|^(1-α)`` over the group's weights, float32 [in].

    Both maxima are floored at 1e-5 so dead channels give a finite, positive scale.
    """
    w_amax = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    a = act_amax.to(device=w_amax.device, dtype=torch.float32).clamp_min(_FLOOR)
    s = a.pow(alpha) / w_amax.clamp_min(_FLOOR).pow(1.0 - alpha)
    return s.clamp_min(_FLOOR)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """``norm.weight /= s`` (and its bias, if any); each Linear's columns ``*= s``. In place,
    computed in float32 and written back in each parameter's dtype."""
    for p in (norm.weight, getattr(norm, "bias", None)):
        if p is not None:
            p.copy_((p.to(torch.float32) / s).to(p.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.to(torch.float32) * s).to(lin.weight.dtype))


def smooth_layer(layer: nn.Module, arch: Architecture, calib, alpha: float) -> dict[str, torch.Tensor]:
    """Observe the norm-produced inputs in one calibration pass, then fold scales into every
    norm-producer group of ``layer``. Returns the scales by group producer name."""
    groups = [g for g in arch.groups if g.producer_is_norm]
    stats = {g.linears[0]: ChannelAbsMax() for g in groups}
    calib.run({name: st.add for name, st in stats.items()})
    scales = {}
    for g in groups:
        linears = [layer.get_submodule(n) for n in g.linears]
        s = smoothing_scales(stats[g.linears[0]].amax, [lin.weight for lin in linears], alpha)
        fold_into_norm(layer.get_submodule(g.producer), linears, s)
        scales[g.producer] = s
    return scales
