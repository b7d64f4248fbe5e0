"""Folding a per-input-channel scale into the op that produces an input group's tensor.

AWQ and SmoothQuant divide the producer's output channels by ``s`` and multiply the
consumers' input columns by ``s``: the float function is unchanged (the graph proved it for
this layer type), while what the quantizer sees is rebalanced. How the producer divides
depends on its kind: a norm's weight, Gemma's ``1 + w``, or a Linear's output rows (a row
slice of a fused projection, the "up" half of a GLU, the v rows behind attention).
"""

from __future__ import annotations

import torch
from torch import nn

from .types import InputGroup, Producer


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def producer_scales(group: InputGroup, s: torch.Tensor) -> torch.Tensor:
    """The scale of each producer channel, from ``s`` over the group's input channels.

    One-to-one maps just reorder; under a tie (GQA) every consumer channel of one producer
    channel must carry the same value, and the last one written wins.
    """
    cmap = group.producer.channels
    n = s.shape[0]
    idx = cmap.index(n, s.device)
    out = torch.empty(cmap.producer_channels(n), device=s.device, dtype=s.dtype)
    out[idx] = s
    return out


@torch.no_grad()
def divide_producer(layer: nn.Module, producer: Producer, t: torch.Tensor) -> None:
    """Divide the producer's output channels ``start .. start+len(t)`` by ``t`` in place."""
    if producer.module is None or not producer.exact:
        raise ValueError(f"cannot fold into producer {producer.module!r} ({producer.kind}): {producer.reason}")
    mod = layer.get_submodule(producer.module)
    start = producer.channels.start
    rows = slice(start, start + t.shape[0])
    weight, bias = mod.weight, getattr(mod, "bias", None)
    if producer.kind == "offset_norm":
        wd = _work_dtype(weight)
        weight[rows] = ((1 + weight[rows].to(wd)) / t.to(wd) - 1).to(weight.dtype)
    elif producer.kind == "norm":
        weight[rows] = (weight[rows].to(_work_dtype(weight)) / t).to(weight.dtype)
    else:  # a Linear's output rows
        wd = _work_dtype(weight)
        weight[rows] = (weight[rows].to(wd) / t.to(wd).unsqueeze(1)).to(weight.dtype)
    if bias is not None:
        bias[rows] = (bias[rows].to(_work_dtype(bias)) / t).to(bias.dtype)


@torch.no_grad()
def fold_scales(layer: nn.Module, group: InputGroup, s: torch.Tensor) -> None:
    """Fold ``s`` (positive, one per input channel of ``group``) into ``layer``: the producer's
    channels ``/= s``, every consumer's input columns ``*= s``. In place, computed in at
    least float32 and written back in each parameter's dtype."""
    divide_producer(layer, group.producer, producer_scales(group, s))
    for name in group.linears:
        w = layer.get_submodule(name).weight
        w.copy_((w.to(_work_dtype(w)) * s.to(_work_dtype(w))).to(w.dtype))
