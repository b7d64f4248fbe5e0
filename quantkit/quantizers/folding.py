"""Folding a per-input-channel scale into the op that produces a Linear group's input.

AWQ and SmoothQuant both divide the producer's output channels by ``s`` and multiply the
consumers' input columns by ``s``: the float function is unchanged, while what the quantizer
sees (weights for AWQ, activations for SmoothQuant) is rebalanced.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def fold_scales(producer: nn.Module, producer_is_norm: bool, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """``producer`` output ``/= s`` (a norm's weight and bias, or a Linear's output rows and
    bias), the consumers' input columns ``*= s``. In place, computed in float32 and written
    back in each parameter's dtype."""
    for p in (producer.weight, getattr(producer, "bias", None)):
        if p is None:
            continue
        div = s if (producer_is_norm or p.dim() == 1) else s.unsqueeze(1)
        p.copy_((p.to(torch.float32) / div).to(p.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.to(torch.float32) * s).to(lin.weight.dtype))
