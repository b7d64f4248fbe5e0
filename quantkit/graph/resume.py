"""Running a decoder layer from the residual its attention block leaves (``Resume``).

A sequential quantizer's later passes, and the quantized stream's propagation, read only the
layer's MLP: the attention of a stream whose first block is final is run once, its residual
kept in place of the layer's input, and every later forward starts there. The layer's own
forward still runs; the modules before the second block (the input norm, the attention, a
post-norm) return zeros, which add nothing to the residual, so what follows is computed
exactly as before, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .types import Resume


def _zero_forward(returns: tuple[bool, ...] | None):
    def forward(*args, **kwargs):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
        zeros = torch.zeros_like(x)
        return zeros if returns is None else tuple(zeros if t else None for t in returns)

    return forward


@contextlib.contextmanager
def resumed(layer: nn.Module, resume: Resume) -> Iterator[None]:
    """``layer`` called on the residual ``resume.reader`` reads gives its output while inside."""
    mods = [layer.get_submodule(n) for n in resume.skipped]
    for m, returns in zip(mods, resume.returns):
        m.forward = _zero_forward(returns)
    try:
        yield
    finally:
        for m in mods:
            del m.forward
