"""Deriving a decoder layer's graph from the model's own code.

A random float64 instance of the layer class is built from the model's own config class
(hidden and intermediate sizes shrunk; head counts and head size real, so head maps are the
real ones; row ranges are read off a meta-device run of the real layer) and run under the recorder of ``trace.py`` with the arguments its own model's
forward gives it. From those runs:

- input groups: Linears that read the same tensor object;
- row segments of a fused projection: views the code takes of its output (slices, chunks);
- roles: which segment feeds attention's query, key or value (autograd dependence);
- producers: the module whose output channels reach a group's input channel for channel
  and multiplicatively (scale each candidate's output channels by random positive factors
  and read the ratio at the consumer: constant per channel and equal to one of the factors);
  the channel map that says which (one-to-one, an offset slice, or GQA heads sharing a kv
  head);
- how a norm takes a fold (``x·w`` or Gemma's ``x·(1+w)``), tested on the module alone;
- residual readers and writers, from the adds in the layer's own forward.

Then every claim is confirmed numerically: each fold with random positive scales and the
rotation with a random orthogonal matrix must leave the float64 layer's output unchanged to
1e-6 relative. A claim that fails is recorded as not exact, with the reason, so a wrong rule
never reaches a checkpoint. ``overrides.py`` holds what tracing cannot decide.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .capture import LayerCall, capture, materialize_on_use
from .fold import fold_scales
from .overrides import override_for
from .rotate import random_orthogonal, rotate_layer
from .skeleton import build_meta, materialize
from .trace import TRACE_ATTENTION, LayerRun, register_trace_attention, run_layer
from .types import (
    ChannelMap,
    InputGroup,
    LayerGraph,
    Producer,
    ResidualReader,
    ResidualWriter,
    Segment,
    Unit,
    Unquantized,
)

log = logging.getLogger(__name__)

BATCH, TOKENS = 2, 8
# A true identity leaves ~1e-14 in float64, but many norms compute in float32 whatever the
# input dtype (Llama's RMSNorm, Gemma's 1 + w, Cohere's LayerNorm): ~1e-7 there. A wrong rule
# leaves ~1e-1.
EXACT_RTOL = 1e-6
# Shrunk sizes: distinct from each other and from every real dimension left unshrunk, so
# each tensor's channels are told apart by their count as well.
_HIDDEN_CHOICES = (64, 80, 96, 112, 48)
_INTERMEDIATE_CHOICES = (160, 176, 144, 208, 224)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__"}
_SAME = {"to", "float", "type", "contiguous", "clone", "type_as", "detach"}
_SCALAR = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_"}

_CACHE: dict[tuple, LayerGraph] = {}


class DerivationError(Exception):
    """The layer's graph cannot be derived; the message says why."""


# --------------------------------------------------------------------------- tiny instance


def _signature(layer: nn.Module) -> tuple:
    return (type(layer).__name__,
            tuple((n, type(m).__name__) for n, m in layer.named_modules()),
            tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()))


def _same_structure(tiny: nn.Module, real: nn.Module, sizes: dict[int, int]) -> bool:
    """Same parameters, and every dimension either real or a shrunk size (``sizes`` maps a
    tiny size to the real one; a fused projection may hold several of one, as ``2 * I``)."""
    a, b = dict(tiny.named_parameters()), dict(real.named_parameters())
    if a.keys() != b.keys():
        return False

    def explained(t: int, r: int) -> bool:
        return t == r or any(t % st == 0 and t // st * sr == r and t // st <= 4 for st, sr in sizes.items())

    return all(p.dim() == b[n].dim() and all(explained(t, r) for t, r in zip(p.shape, b[n].shape))
               for n, p in a.items())


@torch.no_grad()
def _randomize(layer: nn.Module, gen: torch.Generator) -> None:
    """Weights that make every channel distinct: Linears ~ N(0, 1/in), 1-D weights in
    [0.5, 1.5] (positive, not 1, so both x·w and x·(1+w) norms are exercised), biases small."""
    for name, p in layer.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        else:
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))


class _Tiny:
    """A float64 instance of layer ``index`` of ``decoder``'s class, and its arguments.

    ``mode`` "shrink": small hidden and intermediate sizes, head counts and head size real;
    "shrink_heads" (for attention that takes its head size from hidden / heads): one kv head
    and its share of query heads, head size real; "real": the real sizes. Head maps depend
    only on the head size and the query heads per kv head, which every mode keeps; row ranges
    are read off a meta-device run of the real layer (``_real_segments``)."""

    def __init__(self, decoder: nn.Module, layers_attr: str, index: int, mode: str):
        real = getattr(decoder, layers_attr)[index]
        cfg = copy.deepcopy(decoder.config)
        self.h_real = int(cfg.hidden_size)
        self.h = self.h_real
        sizes: dict[int, int] = {}
        if mode != "real":
            taken = {int(d) for p in real.parameters() for d in p.shape}
            heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or self.h_real // heads)
            cfg.head_dim = head_dim
            if mode == "shrink":
                self.h = next(h for h in _HIDDEN_CHOICES if h not in taken)
            else:  # the attention derives its head size from hidden / heads: shrink the heads instead
                cfg.num_attention_heads, cfg.num_key_value_heads = heads // kv, 1
                self.h = heads // kv * head_dim
                sizes[head_dim] = kv * head_dim
            cfg.hidden_size = self.h
            sizes[self.h] = self.h_real
            inter = getattr(cfg, "intermediate_size", None)
            if isinstance(inter, int) and inter > max(_INTERMEDIATE_CHOICES):
                cfg.intermediate_size = next(i for i in _INTERMEDIATE_CHOICES if i not in taken)
                sizes[cfg.intermediate_size] = inter
        register_trace_attention()
        # Eager experts (a loop over each expert's matrices): grouped-matmul kernels take no float64.
        model = build_meta(type(decoder), cfg, torch.float64, TRACE_ATTENTION, experts_implementation="eager")
        layers = getattr(model, layers_attr)
        prefix = f"{layers_attr}.{index}"
        self.layer = materialize(model, prefix, "cpu").eval()
        if not _same_structure(self.layer, real, sizes):
            raise DerivationError("the layer's other dimensions change with its hidden or intermediate size")
        gen = torch.Generator().manual_seed(1234 + index)
        _randomize(self.layer, gen)
        x = torch.randn(BATCH, TOKENS, self.h, dtype=torch.float64, generator=gen)
        undo = materialize_on_use(model, layers, lambda name, m: materialize(model, name, "cpu", m))
        try:
            got = capture(lambda: model(inputs_embeds=x, use_cache=False), layers, upto=index)
        finally:
            undo()
        self.x: torch.Tensor = got.hidden
        self.call: LayerCall = got.calls[index]
        self.gen = gen

    def run(self, layer: nn.Module | None = None, x: torch.Tensor | None = None, **kw) -> LayerRun:
        return run_layer(self.layer if layer is None else layer, self.x if x is None else x, self.call, **kw)


# --------------------------------------------------------------------------- channel flow


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _channel_mask(grad: torch.Tensor | None, n: int) -> torch.Tensor:
    if grad is None:
        return torch.zeros(n, dtype=torch.bool)
    return _rows(grad).abs().amax(0) > 0


def _flow(base: torch.Tensor, probe: torch.Tensor, r: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """How scaling a producer's channels by ``r`` changed a consumer input:
    ``"none"``, ``"map"`` (each consumer channel is one producer channel times its factor;
    the map is returned) or ``"mixed"``."""
    x, y = _rows(base).detach(), _rows(probe).detach()
    if torch.equal(x, y):
        return "none", None
    big = x.abs() > 1e-9 * x.abs().max()
    if not bool(big.any(0).all()):
        return "mixed", None
    ratio = torch.where(big, y / torch.where(big, x, torch.ones_like(x)), torch.nan)
    hi = torch.nan_to_num(ratio, nan=-torch.inf).amax(0)
    lo = torch.nan_to_num(ratio, nan=torch.inf).amin(0)
    rho = (hi + lo) / 2
    if not bool(((hi - lo) <= 1e-9 * rho.abs()).all()):
        return "mixed", None
    order = torch.argsort(r)
    pos = torch.searchsorted(r[order], rho).clamp(max=r.shape[0] - 1)
    cand = torch.stack([pos, (pos - 1).clamp(min=0)])
    err = (r[order][cand] - rho).abs()
    best = err.argmin(0)
    idx = order[cand.gather(0, best.unsqueeze(0)).squeeze(0)]
    if not bool((err.gather(0, best.unsqueeze(0)).squeeze(0) <= 1e-9 * rho.abs()).all()):
        return "mixed", None
    return "map", idx


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def segments_of(run: LayerRun, outputs: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, int]]]:
    """For each Linear output, the row ranges its consumers take as last-dim slices of it
    (works on meta tensors too: views are matched through their base, not their memory)."""
    spans: dict[str, list[tuple[int, int]]] = {n: [] for n in outputs}
    roots = {id(_root(o)): n for n, o in outputs.items()}
    for op in run.ops:
        for t in op.outputs:
            n = roots.get(id(_root(t)))
            if n is None:
                continue
            base = outputs[n]
            if t.dim() == base.dim() and t.shape[:-1] == base.shape[:-1] and t.shape[-1] < base.shape[-1] \
                    and t.stride() == base.stride():
                start = t.storage_offset() - base.storage_offset()
                spans[n].append((start, start + t.shape[-1]))
    out = {}
    for n, found in spans.items():
        width = outputs[n].shape[-1]
        cuts = sorted({0, width} | {a for a, _ in found} | {b for _, b in found})
        out[n] = list(zip(cuts[:-1], cuts[1:]))
    return out


def _channel_map(pi: torch.Tensor, start: int, head_dims: set[int]) -> ChannelMap | None:
    n = pi.shape[0]
    if torch.equal(pi, torch.arange(n)):
        return ChannelMap(start=start)
    for d in sorted(head_dims):
        producers = int(pi.max()) + 1
        if n % producers or producers % d:
            continue
        cm = ChannelMap(start=start, group=n // producers, head_dim=d)
        if torch.equal(pi, cm.index(n)):
            return cm
    return None


# --------------------------------------------------------------------------- norms


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _norm_weight_kind(mod: nn.Module, dim: int, gen: torch.Generator) -> str:
    """``norm`` if the output scales with the weight (x̂·w), ``offset_norm`` if with 1 + w
    (x̂·(1+w)), else ``unfoldable`` — tested on the module alone with random inputs."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return "unfoldable"
    x = torch.randn(3, 5, dim, dtype=w.dtype, generator=gen)
    r = 0.5 + torch.rand(w.shape, dtype=w.dtype, generator=gen)
    with torch.no_grad():
        base = mod(x)
        for kind, new_w in (("norm", w * r), ("offset_norm", (1 + w) * r - 1)):
            m = copy.deepcopy(mod)
            m.weight.copy_(new_w)
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(r)
            if _rel_err(m(x), base * r) <= EXACT_RTOL:
                return kind
    return "unfoldable"


def _rotation_invariant(mod: nn.Module, kind: str, dim: int, gen: torch.Generator) -> bool:
    """The norm with a neutral weight commutes with an orthogonal rotation (RMS norms do;
    mean-centring LayerNorms and biased norms do not)."""
    if getattr(mod, "bias", None) is not None:
        return False
    m = copy.deepcopy(mod)
    with torch.no_grad():
        m.weight.fill_(0.0 if kind == "offset_norm" else 1.0)
        x = torch.randn(3, 5, dim, dtype=m.weight.dtype, generator=gen)
        q = random_orthogonal(dim, gen).to(m.weight.dtype)
        return _rel_err(m(x @ q), m(x) @ q) <= EXACT_RTOL


# --------------------------------------------------------------------------- derivation


class _Deriver:
    def __init__(self, tiny: _Tiny):
        self.t = tiny
        self.layer = tiny.layer
        self.mods = dict(self.layer.named_modules())
        self.linears = [n for n, m in self.mods.items() if isinstance(m, nn.Linear)]
        self.unquantized: list[Unquantized] = []
        self.unsupported: list[str] = []

    # -- the base run and what it says directly
    def derive(self) -> LayerGraph:
        self.base = self.t.run(record_ops=True, grad=True)
        run = self.base
        conv_params = {id(p) for m in self.mods.values() if isinstance(m, _CONV) for p in m.parameters()}
        experts = tuple(n for n, p in self.layer.named_parameters() if p.dim() >= 3 and id(p) not in conv_params)
        if experts:
            self.unsupported.append(
                f"Mixture-of-Experts experts ({', '.join(experts)}) are not supported yet (issue 16)")
        called = {n: run.calls_of(n) for n in self.linears}
        self.run_linears = [n for n in self.linears if called[n]]
        for n in self.linears:
            if not called[n]:
                self.unquantized.append(Unquantized(n, "not run by the layer's forward"))
            elif len(called[n]) > 1:
                self.unsupported.append(f"{n} runs {len(called[n])} times in one forward")
        self.run_linears.sort(key=lambda n: called[n][0].order)
        self.out = {n: called[n][0].output for n in self.run_linears}
        self.inp = {n: called[n][0].input for n in self.run_linears}
        self.routers = self._routers()
        for n in self.routers:
            self.unquantized.append(Unquantized(n, "router: its output picks experts (kept in float, as vLLM does)"))
        self._convs()
        self.quant = [n for n in self.run_linears if n not in self.routers]
        self.segments = self._segments()
        self.attn_roles = self._attention_roles()
        self._stream()
        groups = self._groups()
        readers, writers = self._residual(groups)
        for n, m in self.mods.items():
            if n and not list(m.children()) and not isinstance(m, nn.Linear) and any(
                    p.dim() == 1 for p in m.parameters(recurse=False)):
                self.unquantized.append(Unquantized(n, "norm: kept in float"))
        units = tuple(self._unit(n) for n in self.quant)
        if not units and not experts:
            self.unsupported.append("it has no nn.Linear to quantize (e.g. GPT-2's Conv1D projections)")
        graph = LayerGraph(
            layer_class=type(self.layer).__name__, units=units, groups=groups, readers=readers, writers=writers,
            unquantized=tuple(self.unquantized), unsupported="; ".join(self.unsupported) or None, experts=experts)
        if graph.rotatable:
            graph = self._verify_rotation(graph)
        return graph

    def _grads(self, sink: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """Which output channels of each Linear in ``names`` influence ``sink``."""
        outs = [self.out[n] for n in names]
        if not outs:
            return {}
        if not sink.requires_grad:
            return {n: torch.zeros(o.shape[-1], dtype=torch.bool) for n, o in zip(names, outs)}
        cot = torch.randn(sink.shape, dtype=sink.dtype, generator=self.t.gen)
        grads = torch.autograd.grad((sink * cot).sum(), outs, retain_graph=True, allow_unused=True)
        return {n: _channel_mask(g, o.shape[-1]) for n, g, o in zip(names, grads, outs)}

    def _routers(self) -> list[str]:
        """Linears scoring experts: one output per expert, reaching a ``topk`` (everything
        before the MoE block reaches it too, through the residual stream, but with another width)."""
        topk = [op.inputs[0] for op in self.base.ops if op.name == "topk" and isinstance(op.inputs[0], torch.Tensor)]
        found: set[str] = set()
        for t in topk:
            if t.requires_grad:
                found |= {n for n, m in self._grads(t, self.run_linears).items()
                          if bool(m.any()) and m.shape[0] == t.shape[-1]}
        return [n for n in self.run_linears if n in found]

    def _convs(self) -> None:
        for name, mod in self.mods.items():
            if not isinstance(mod, _CONV):
                continue
            fed = [n for n in self.run_linears if self.inp[n].requires_grad and torch.autograd.grad(
                self.inp[n].sum(), mod.weight, retain_graph=True, allow_unused=True)[0] is not None]
            what = f"feeds {fed[0]}" if fed else "is part of it"  # the first Linear after it reads it
            self.unsupported.append(f"convolution {name} {what} (hybrid convolution/state-space layers are not "
                                    "supported)")

    def _segments(self) -> dict[str, list[tuple[int, int]]]:
        """Row ranges of each Linear's output that its code uses separately (views of the
        output: Phi-3's ``qkv[..., :q]``, ``gate_up.chunk(2, -1)``)."""
        return segments_of(self.base, {n: self.out[n] for n in self.quant})

    def _attention_roles(self) -> dict[tuple[str, int], str]:
        """q/k/v of each segment, from which attention input its channels influence."""
        roles: dict[tuple[str, int], str] = {}
        feeds: dict[str, dict[str, torch.Tensor]] = {}
        for a in self.base.attention:
            for what, t in (("q", a.query), ("k", a.key), ("v", a.value)):
                for n, m in self._grads(t, self.quant).items():
                    prev = feeds.setdefault(n, {}).get(what)
                    feeds[n][what] = m if prev is None else prev | m
        for n in self.quant:
            for i, (a, b) in enumerate(self.segments[n]):
                hit = [w for w, m in feeds.get(n, {}).items() if bool(m[a:b].any())]
                if len(hit) == 1 and bool(feeds[n][hit[0]][a:b].all()):
                    roles[(n, i)] = hit[0]
        return roles

    # -- groups and producers
    def _groups(self) -> tuple[InputGroup, ...]:
        by_input: dict[tuple, list[str]] = {}
        for n in self.quant:
            by_input.setdefault(_key(self.inp[n]), []).append(n)
        self.group_lists = list(by_input.values())
        probes = self._probes()
        groups = []
        self.producer_of: dict[int, Producer] = {}
        self.roles: dict[tuple[str, int], str] = dict(self.attn_roles)
        for gi, names in enumerate(self.group_lists):
            producer = self._producer(gi, names, probes)
            fused = self._fused(names)
            groups.append(InputGroup(tuple(names), producer, fused))
        groups = [replace(g, producer=self._verify_fold(g)) for g in groups]
        for g in groups:
            if g.producer.kind == "attention_value":
                for n in g.linears:
                    self.roles.setdefault((n, 0), "o")
        return tuple(groups)

    def _probes(self) -> list[tuple[str, int, int, str, torch.Tensor, LayerRun]]:
        """Every candidate producer (a Linear's row segment, or a norm), each run once with
        its output channels scaled by random factors in [0.5, 2]: (module, first row, end
        row, kind, factors, run)."""
        cands = []
        for n in self.quant:
            for a, b in self.segments[n]:
                cands.append((n, a, b, "linear"))
        for name, mod in self.mods.items():
            if not name or list(mod.children()) or isinstance(mod, (nn.Linear, nn.Embedding, *_CONV)):
                continue
            w = getattr(mod, "weight", None)
            call = self.base.first(name)
            if isinstance(w, nn.Parameter) and w.dim() == 1 and call is not None and call.output is not None \
                    and call.output.shape[-1] == w.shape[0]:
                cands.append((name, 0, w.shape[0], "norm"))
        out = []
        for mod, a, b, kind in cands:
            r = 0.5 + 1.5 * torch.rand(b - a, dtype=torch.float64, generator=self.t.gen)
            with torch.no_grad():
                out.append((mod, a, b, kind, r, self.t.run(scale={mod: (a, r)})))
        return out

    def _producer(self, gi: int, names: list[str], probes) -> Producer:
        key = names[0]
        base_in = self.inp[key]
        if id(base_in) in self.resid or _key(base_in) == _key(self.base.input):
            return Producer(None, "unfoldable", reason="reads the residual stream directly (no norm before it)")
        found = None
        order = {c.name: c.order for c in reversed(self.base.calls)}
        for mod, a, b, kind, r, probe in probes:
            verdict, pi = _flow(base_in, probe.first(key).input, r)
            if verdict == "map":
                rank = (order.get(mod, -1), a)
                if found is None or rank > found[0]:
                    found = (rank, mod, a, b, kind, pi)
        if found is None:
            return Producer(None, "unfoldable",
                            reason="no module's output reaches it channel for channel (a nonlinearity or a "
                                   "weightless norm sits in between)")
        _, mod, a, b, kind, pi = found
        heads = {int(c.value.shape[-1]) for c in self.base.attention}
        cmap = _channel_map(pi, a, heads)
        if cmap is None:
            return Producer(mod, "unfoldable", rows=(a, b),
                            reason="its channels reach the group through a map that is neither one-to-one nor "
                                   "a GQA head map")
        if kind == "norm":
            pkind = _norm_weight_kind(self.mods[mod], b, self.t.gen)
            if pkind == "unfoldable":
                return Producer(mod, "unfoldable", cmap, reason="a norm whose output does not scale with its weight")
            return Producer(mod, pkind, cmap)
        seg = self.segments[mod].index((a, b))
        if self.attn_roles.get((mod, seg)) == "v":
            pkind = "attention_value"
        else:
            pkind = "linear_rows"
            gate = self._glu_gate(mod, seg, key)
            if gate:
                pkind = "glu_partner"
                self.roles[(mod, seg)] = "up"
                for g in gate:
                    self.roles[g] = "gate"
                for n in names:
                    self.roles.setdefault((n, 0), "down")
        return Producer(mod, pkind, cmap, rows=(a, b))

    def _glu_gate(self, mod: str, seg: int, consumer: str) -> list[tuple[str, int]]:
        """Segments reading the producer's input that also reach ``consumer``'s input (the
        gate of ``act(gate) * up``)."""
        siblings = [n for n in self.quant if _key(self.inp[n]) == _key(self.inp[mod])]
        masks = self._grads(self.inp[consumer], siblings)
        return [(n, i) for n in siblings for i, (a, b) in enumerate(self.segments[n])
                if (n, i) != (mod, seg) and bool(masks[n][a:b].any())]

    def _fused(self, names: list[str]) -> tuple[tuple[str, ...], ...]:
        parents: dict[str, list[str]] = {}
        for n in names:
            parents.setdefault(n.rpartition(".")[0], []).append(n)
        return tuple(tuple(v) for v in parents.values())

    def _verify_fold(self, g: InputGroup) -> Producer:
        p = g.producer
        if p.kind == "unfoldable":
            return p
        p = replace(p, exact=True)
        n = self.inp[g.key].shape[-1]
        t = 0.5 + 1.5 * torch.rand(p.channels.producer_channels(n), dtype=torch.float64, generator=self.t.gen)
        s = t[p.channels.index(n)]
        layer = copy.deepcopy(self.layer)
        try:
            fold_scales(layer, replace(g, producer=p), s)
            with torch.no_grad():
                got = self.t.run(layer).output
        except Exception as e:  # a rule that cannot even be applied is not exact either
            return replace(p, exact=False, reason=f"folding fails ({type(e).__name__}: {e})")
        err = _rel_err(got, self.base.output.detach())
        if err > EXACT_RTOL:
            return replace(p, exact=False, reason=f"folding a scale changes the layer's output (relative error "
                                                  f"{err:.1e} on a float64 instance): its output has other readers")
        return p

    # -- residual stream
    def _stream(self) -> None:
        """The residual stream: the layer's input and every add of the layer's own forward
        that takes a stream tensor; the other operand of such an add is a write."""
        run = self.base
        self.resid = {id(run.input)}
        self.writes: list[torch.Tensor] = []
        self.touched: list[str] = []
        for op in run.ops:
            if op.depth != 0:
                continue
            ins = [x for x in op.inputs if isinstance(x, torch.Tensor)]
            hit = [x for x in ins if id(x) in self.resid]
            if not hit:
                continue
            out = op.outputs[0]
            if op.name in _ADD and len(ins) == 2:
                other = ins[1] if ins[0] is hit[0] else ins[0]
                if id(other) not in self.resid:
                    self.writes.append(other)
                self.resid.add(id(out))
            elif op.name in _SAME and out.shape == hit[0].shape:
                self.resid.add(id(out))
            elif op.name in _SCALAR and len(ins) == 1:
                self.resid.add(id(out))
            elif op.name not in ("size", "dim"):
                self.touched.append(op.name)

    def _residual(self, groups) -> tuple[tuple[ResidualReader, ...], tuple[ResidualWriter, ...]]:
        run = self.base
        readers = []
        norm_groups = {g.producer.module: g for g in groups if g.producer.module is not None}
        for c in run.calls:
            mod = self.mods[c.name]
            if c.input is None or id(c.input) not in self.resid or list(mod.children()):
                continue
            readers.append(self._reader(c.name, mod, norm_groups))
        writers = [self._writer(w) for w in self.writes]
        if id(run.output) not in self.resid or self.touched:
            why = f"the residual stream goes through {', '.join(sorted(set(self.touched)))}" if self.touched else \
                "the layer's output is not the residual stream"
            readers = [replace(r, rotatable=False, reason=r.reason or why) for r in readers] or [
                ResidualReader("(layer)", "other", reason=why)]
        return tuple(readers), tuple(writers)

    def _reader(self, name: str, mod: nn.Module, norm_groups) -> ResidualReader:
        if isinstance(mod, nn.Linear):
            return ResidualReader(name, "linear", rotatable=True)
        g = norm_groups.get(name)
        dim = self.t.h
        kind = _norm_weight_kind(mod, dim, self.t.gen) if getattr(mod, "weight", None) is not None else "other"
        if kind == "unfoldable" or g is None:
            return ResidualReader(name, "other", reason="not a norm feeding Linears directly")
        consumers = tuple(g.linears)
        if not _rotation_invariant(mod, kind, dim, self.t.gen):
            return ResidualReader(name, kind, consumers,
                                  reason="the norm does not commute with a rotation (it centres its input or adds a "
                                         "bias); unrotatable unless it is first made an RMS norm")
        return ResidualReader(name, kind, consumers, rotatable=True)

    def _writer(self, w: torch.Tensor) -> ResidualWriter:
        for c in self.base.calls:
            if c.output is w and isinstance(self.mods[c.name], nn.Linear):
                return ResidualWriter(c.name, "linear_rows", rotatable=True)
        for c in reversed(self.base.calls):
            if c.output is w and not list(self.mods[c.name].children()):
                return ResidualWriter(
                    c.name, "post_norm",
                    reason="a post-norm sits between the Linear and the residual stream; its weight does not "
                           "commute with a rotation, so the writer side is not rotatable unless handled")
        return ResidualWriter("(unknown)", "other", reason="the residual update is not a Linear's output")

    def _verify_rotation(self, graph: LayerGraph) -> LayerGraph:
        q = random_orthogonal(self.t.h, self.t.gen)
        layer = copy.deepcopy(self.layer)
        rotate_layer(layer, graph, q)
        with torch.no_grad():
            got = self.t.run(layer, x=self.t.x @ q).output
        err = _rel_err(got, self.base.output.detach() @ q)
        if err <= EXACT_RTOL:
            return graph
        why = f"rotating the stream changes the layer's output (relative error {err:.1e} on a float64 instance)"
        return replace(graph, readers=tuple(replace(r, rotatable=False, reason=why) for r in graph.readers))

    # -- units
    def _unit(self, n: str) -> Unit:
        lin = self.mods[n]
        segs = tuple(Segment(self.roles.get((n, i), "other"), a, b) for i, (a, b) in enumerate(self.segments[n]))
        return Unit(n, f"{n}.weight", lin.in_features, lin.out_features, segs, bias=lin.bias is not None)


# --------------------------------------------------------------------------- real shapes


def _to_meta(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta", dtype=dtype if x.is_floating_point() else x.dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v, dtype) for k, v in x.items()}
    return x


def _real_segments(real: nn.Module, tiny: _Tiny, names: tuple[str, ...]) -> dict[str, list[tuple[int, int]]]:
    """Row ranges of the real layer, from running it on the meta device (shapes only)."""
    dtype = next(real.parameters()).dtype
    x = torch.empty(BATCH, TOKENS, tiny.h_real, device="meta", dtype=dtype)
    call = LayerCall(_to_meta(tiny.call.args, dtype), _to_meta(tiny.call.kwargs, dtype))
    # Experts (3-D parameters) pick tokens by value, which the meta device cannot do; they hold
    # no Linear unit, so a stand-in that keeps the shape serves.
    experts = [m for m in real.modules() if any(p.dim() >= 3 for p in m.parameters(recurse=False))
               and not isinstance(m, _CONV)]
    for m in experts:
        m.forward = lambda hidden_states, *a, **k: torch.zeros_like(hidden_states)
    try:
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


def _realize(graph: LayerGraph, real: nn.Module, tiny: _Tiny) -> LayerGraph:
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


def derive_layer_graph(decoder: nn.Module, layers_attr: str, index: int) -> LayerGraph:
    """The graph of layer ``index`` of ``decoder`` (the meta text model), cached per config
    and layer structure: an 80-layer model derives once per distinct layer type."""
    real = getattr(decoder, layers_attr)[index]
    cfg = decoder.config
    key = (type(cfg).__name__, cfg.to_json_string(use_diff=False), _signature(real))
    if key in _CACHE:
        return _CACHE[key]
    began = time.perf_counter()
    modes = ("shrink", "shrink_heads", "real") if int(cfg.hidden_size) > 256 else ("real",)
    threads = torch.get_num_threads()
    # Tiny matrices: threads only add synchronisation (30x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # dependence queries need autograd, whatever the caller's mode
            graph = _derive_tiny(decoder, layers_attr, index, real, modes)
    finally:
        torch.set_num_threads(threads)
    graph = override_for(cfg, graph)
    _CACHE[key] = graph
    log.debug("derived the %s graph in %.2f s", graph.layer_class, time.perf_counter() - began)
    return graph


def _derive_tiny(decoder: nn.Module, layers_attr: str, index: int, real: nn.Module,
                 modes: tuple[str, ...]) -> LayerGraph:
    graph = _failed(real, "no attempt")
    for mode in modes:
        try:
            tiny = _Tiny(decoder, layers_attr, index, mode)
            graph = _Deriver(tiny).derive()
            graph = _realize(graph, real, tiny)
            break
        except Exception as e:  # any failure, of the rules or of the model's own code on the instance
            why = str(e) if isinstance(e, DerivationError) else f"{type(e).__name__}: {e}"
            graph = _failed(real, why)
            log.debug("layer graph in mode %s failed (%s)", mode, why)
    return graph


def _failed(real: nn.Module, why: str) -> LayerGraph:
    return LayerGraph(type(real).__name__, (), (), unsupported=f"its graph cannot be derived ({why})")
