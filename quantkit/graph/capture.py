"""Per-layer arguments from the model's own forward.

Attention masks (causal, sliding-window, bidirectional image spans), RoPE tables (local and
global, multimodal M-RoPE), position ids and embedding scaling are whatever the model's
top-level forward computes: quantkit runs that forward on the meta skeleton with the decoder
layers' ``forward`` replaced by recorders that keep the arguments each layer receives (by
reference, not copies) and pass the hidden state through. Modules the forward touches on the
way (embedding, rotary tables, final norm, lm_head) are made real the first time they run, by
a callback the caller supplies; the vision tower of a multimodal model is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .skeleton import is_meta


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


class _TupleOutputs(Exception):
    """The model's layer loop indexes each layer's output (``layer_outputs[0]``)."""


@dataclass
class LayerCall:
    """What one decoder layer receives besides its hidden state (references)."""

    args: tuple
    kwargs: dict[str, Any]


def patch_layers(layers: nn.ModuleList, make: Callable[[int], Callable]) -> Callable[[], None]:
    """Replace each layer's ``forward`` (an instance attribute, so the layer's class, hooks and
    attributes such as ``attention_type`` stay as they are); returns the undo."""
    for i, layer in enumerate(layers):
        layer.forward = make(i)

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)

    return undo


def materialize_on_use(model: nn.Module, skip: nn.Module, make_real: Callable[[str, nn.Module], None],
                       exclude: tuple[nn.Module, ...] = ()) -> Callable[[], None]:
    """Before any module outside ``skip`` (the decoder layers) and ``exclude`` runs with meta
    tensors, call ``make_real(name, module)``; returns the undo (hooks removed)."""
    inside = {id(m) for m in skip.modules()} | {id(m) for e in exclude for m in e.modules()}
    handles = []
    for name, mod in model.named_modules():
        if id(mod) in inside or not is_meta(mod):
            continue

        def hook(m, _args, name=name):
            if is_meta(m):
                make_real(name, m)

        handles.append(mod.register_forward_pre_hook(hook))

    def undo() -> None:
        for h in handles:
            h.remove()

    return undo


@dataclass
class Captured:
    """The first layer's hidden-state input, each layer's other arguments, and whether the
    model's layer loop indexes layer outputs (``layer_outputs[0]``)."""

    hidden: torch.Tensor
    calls: list[LayerCall]
    tuple_outputs: bool


def capture(run: Callable[[], Any], layers: nn.ModuleList, upto: int | None = None) -> Captured:
    """Call ``run()`` (the model's forward) with recorders in place of ``layers`` up to
    ``upto`` (default: all layers). A loop that indexes outputs gets 1-tuples back."""
    last = len(layers) - 1 if upto is None else upto
    for tuple_outputs in (False, True):
        calls: list[LayerCall] = []
        first: list[torch.Tensor] = []

        def make(i: int):
            def forward(hidden_states=None, *args, **kwargs):
                if hidden_states is None:
                    hidden_states = kwargs.pop("hidden_states")
                if first and hidden_states.shape != first[0].shape:
                    raise _TupleOutputs
                if not first:
                    first.append(hidden_states)
                calls.append(LayerCall(args, kwargs))
                if i >= last:
                    raise _Stop
                return (hidden_states,) if tuple_outputs else hidden_states

            return forward

        undo = patch_layers(layers, make)
        try:
            with torch.no_grad():
                run()
        except _Stop:
            return Captured(first[0], calls, tuple_outputs)
        except _TupleOutputs:
            continue
        finally:
            undo()
    raise RuntimeError("the model's forward did not reach its decoder layers")


def inject(run: Callable[[], Any], layers: nn.ModuleList, hidden: torch.Tensor, tuple_outputs: bool) -> Any:
    """Call ``run()`` with the decoder layers skipped and ``hidden`` as the last layer's
    output: whatever the model does after its layers (final norm, lm_head, logit softcap or
    scale) then runs as the model itself does it."""

    def make(i: int):
        last = i == len(layers) - 1

        def forward(hidden_states=None, *args, **kwargs):
            out = hidden if last else (hidden_states if hidden_states is not None else kwargs["hidden_states"])
            return (out,) if tuple_outputs else out

        return forward

    undo = patch_layers(layers, make)
    try:
        with torch.no_grad():
            return run()
    finally:
        undo()
