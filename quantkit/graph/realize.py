"""The real layer's shapes and row ranges for a graph derived on a tiny instance: the real
(meta) layer runs on the meta device with the same arguments, so its views are recorded with
the real sizes, at no memory cost."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .capture import LayerCall
from .experts import all_experts
from .flow import segments_of
from .instance import BATCH, TOKENS, DerivationError, TinyLayer
from .trace import run_layer
from .types import LayerGraph, Segment

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _to_meta(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta", dtype=dtype if x.is_floating_point() else x.dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v, dtype) for k, v in x.items()}
    return x


def _real_segments(real: nn.Module, tiny: TinyLayer, names: tuple[str, ...]) -> dict[str, list[tuple[int, int]]]:
    """Row ranges of the real layer, from running it on the meta device (shapes only)."""
    dtype = next(real.parameters()).dtype
    x = torch.empty(BATCH, TOKENS, tiny.h_real, device="meta", dtype=dtype)
    call = LayerCall(_to_meta(tiny.call.args, dtype), _to_meta(tiny.call.kwargs, dtype))
    # 3-D parameters in a layout quantkit does not unfuse pick tokens by value, which the meta
    # device cannot do; they hold no Linear unit (the layer is refused), so a stand-in serves.
    experts = [m for m in real.modules() if any(p.dim() >= 3 for p in m.parameters(recurse=False))
               and not isinstance(m, _CONV)]
    for m in experts:
        m.forward = lambda hidden_states, *a, **k: torch.zeros_like(hidden_states)
    try:
        with all_experts(real):  # every expert runs (the meta device cannot pick tokens by value)
            run = run_layer(real, x, call, record_ops=True)
    finally:
        for m in experts:
            m.__dict__.pop("forward", None)
    outs = {}
    for n in names:
        c = run.first(n)
        if c is None or c.output is None:
            raise DerivationError(f"{n} does not run on the real layer's shapes")
        outs[n] = c.output
    return segments_of(run, outs)


def realize(graph: LayerGraph, real: nn.Module, tiny: TinyLayer) -> LayerGraph:
    """The tiny instance's graph with the real layer's shapes and row ranges."""
    mods = dict(real.named_modules())
    spans = _real_segments(real, tiny, graph.linears)
    units, moved = [], {}
    for u in graph.units:
        m = mods[u.name]
        real_spans = spans[u.name]
        if len(real_spans) != len(u.segments):
            raise DerivationError(f"{u.name} splits its output differently at the real sizes")
        for s, (a, b) in zip(u.segments, real_spans):
            moved[(u.name, s.start, s.end)] = (a, b)
        segs = tuple(Segment(s.role, a, b) for s, (a, b) in zip(u.segments, real_spans))
        units.append(replace(u, in_features=m.in_features, out_features=m.out_features, segments=segs))
    groups = []
    for g in graph.groups:
        p = g.producer
        if p.rows is not None:
            rows = moved.get((p.module, *p.rows))
            if rows is None:
                raise DerivationError(f"{p.module}: its producer rows have no real counterpart")
            p = replace(p, rows=rows, channels=replace(p.channels, start=rows[0]))
        groups.append(replace(g, producer=p))
    return replace(graph, units=tuple(units), groups=tuple(groups))
