"""Seeing what a layer's attention receives: query, key and value after the model's own
q/k norms and RoPE, as the KV cache stores them.

transformers looks up each layer's attention function by name in ``ALL_ATTENTION_FUNCTIONS``
on every call; for the duration of ``observe_attention`` every name maps to a wrapper that
reports the call and then runs the function it stands for (for ``eager``, the model's own
``eager_attention_forward``, which knows its softcapping and sinks).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

AttentionHook = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _eager(module: nn.Module):
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward")


@contextmanager
def observe_attention(hook: AttentionHook) -> Iterator[None]:
    """Call ``hook(module, query, key, value)`` on every attention call inside the block."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = list(ALL_ATTENTION_FUNCTIONS.keys())
    had_eager = "eager" in names
    saved = {n: ALL_ATTENTION_FUNCTIONS[n] for n in names}

    def wrap(original):
        def attention(module, query, key, value, *args, **kwargs):
            hook(module, query, key, value)
            return (original or _eager(module))(module, query, key, value, *args, **kwargs)

        return attention

    for n in names:
        ALL_ATTENTION_FUNCTIONS[n] = wrap(saved[n])
    if not had_eager:
        ALL_ATTENTION_FUNCTIONS["eager"] = wrap(None)
    try:
        yield
    finally:  # drop the wrappers; put back an override someone else had made
        for n in names:
            del ALL_ATTENTION_FUNCTIONS[n]
            if ALL_ATTENTION_FUNCTIONS.get(n) is not saved[n]:
                ALL_ATTENTION_FUNCTIONS[n] = saved[n]
        if not had_eager:
            del ALL_ATTENTION_FUNCTIONS["eager"]
