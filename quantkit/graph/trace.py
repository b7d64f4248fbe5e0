"""Running one decoder layer under a recorder.

A run records, for every submodule, the tensor it read and the tensor it produced; every
torch op (through a ``TorchFunctionMode``) with the depth it ran at (0: in the layer's own
``forward``, between its submodules); and every attention call with its query, key and value
(through an attention function registered with transformers, which then runs the model's own
eager attention). A run may scale chosen output channels of chosen modules, which is how
``derive.py`` follows channels from producers to consumers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .capture import LayerCall

TRACE_ATTENTION = "quantkit_trace"

_ACTIVE: list["LayerRun"] = []


@dataclass
class AttentionCall:
    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor


@dataclass
class ModuleCall:
    name: str
    input: torch.Tensor | None
    output: torch.Tensor | None
    depth: int  # 0: called from the layer's own forward
    order: int


@dataclass
class OpCall:
    name: str
    inputs: tuple[Any, ...]
    outputs: tuple[torch.Tensor, ...]
    depth: int


@dataclass
class LayerRun:
    calls: list[ModuleCall] = field(default_factory=list)
    attention: list[AttentionCall] = field(default_factory=list)
    ops: list[OpCall] = field(default_factory=list)
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    depth: int = 0

    def calls_of(self, name: str) -> list[ModuleCall]:
        return [c for c in self.calls if c.name == name]

    def first(self, name: str) -> ModuleCall | None:
        calls = self.calls_of(name)
        return calls[0] if calls else None


def _traced_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention (its module's ``eager_attention_forward``, which
    knows its softcapping and sinks), recording the call for the active run."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as own
    out, weights = own(module, query, key, value, attention_mask, **kwargs)
    if _ACTIVE:
        _ACTIVE[-1].attention.append(AttentionCall(module, query, key, value, out))
    return out, weights


def register_trace_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(TRACE_ATTENTION, _traced_attention)


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, torch.Tensor):
                return v
    return None


def _tensors(x: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(t for v in x for t in _tensors(v))
    return ()


class _OpRecorder(TorchFunctionMode):
    def __init__(self, run: LayerRun):
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = _tensors(out)
        if outs:
            name = getattr(func, "__name__", str(func))
            self.run.ops.append(OpCall(name, tuple(args) + tuple((kwargs or {}).values()), outs, self.run.depth))
        return out


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall,
              scale: dict[str, tuple[int, torch.Tensor]] | None = None, record_ops: bool = False,
              grad: bool = False) -> LayerRun:
    """Run ``layer`` on ``hidden`` with its recorded arguments.

    ``scale`` maps a module name to ``(start, r)``: its output channels ``start..start+len(r)``
    are multiplied by ``r`` as they leave it. With ``grad`` the run builds an autograd graph
    (for dependence queries through ``torch.autograd.grad``)."""
    run = LayerRun(input=hidden)
    scale = scale or {}
    handles = []
    order = [0]
    for name, mod in layer.named_modules():
        if not name:
            continue

        def pre(m, args, kwargs, name=name):
            x = _first_tensor(args) if args else None
            if x is None:
                x = kwargs.get("hidden_states")
            run.calls.append(ModuleCall(name, x, None, run.depth, order[0]))
            order[0] += 1
            run.depth += 1

        def post(m, args, out, name=name):
            run.depth -= 1
            rec = next(c for c in reversed(run.calls) if c.name == name and c.output is None)
            if name in scale:
                start, r = scale[name]
                first = _first_tensor(out)
                scaled = first.clone()
                scaled[..., start:start + r.shape[0]] *= r
                out = scaled if isinstance(out, torch.Tensor) else type(out)(
                    scaled if v is first else v for v in out)
            rec.output = _first_tensor(out)
            return out

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post))
    _ACTIVE.append(run)
    try:
        with torch.set_grad_enabled(grad):
            if record_ops:
                with _OpRecorder(run):
                    out = layer(hidden, *call.args, **call.kwargs)
            else:
                out = layer(hidden, *call.args, **call.kwargs)
    finally:
        _ACTIVE.pop()
        for h in handles:
            h.remove()
    run.output = _first_tensor(out)
    return run
