"""Deriving a decoder layer's graph from the model's own code.

A random float64 instance of the layer class (``instance.py``) runs under the recorder of
``trace.py`` with the arguments its own model's forward gives it. From those runs
(``flow.py`` reads them):

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
never reaches a checkpoint. Real shapes and row ranges come from the real layer run on the
meta device (``realize.py``); ``overrides.py`` holds what tracing cannot decide.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace

import torch
from torch import nn

from .flow import (
    EXACT_RTOL,
    channel_map,
    channel_mask,
    flow,
    norm_weight_kind,
    rel_err,
    rotation_invariant,
    segments_of,
    tensor_key,
)
from .experts import expert_modules, expert_of
from .fold import fold_scales
from .instance import MODES, DerivationError, TinyLayer, signature
from .overrides import override_for
from .realize import realize
from .resume import resumed
from .rotate import random_orthogonal, rotate_layer
from .trace import LayerRun
from .types import (
    InputGroup,
    LayerGraph,
    Producer,
    ResidualReader,
    ResidualWriter,
    Resume,
    Segment,
    Unit,
    Unquantized,
)

log = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__"}
_SAME = {"to", "float", "type", "contiguous", "clone", "type_as", "detach"}
_SCALAR = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_"}

_CACHE: dict[tuple, LayerGraph] = {}


class _Deriver:
    def __init__(self, tiny: TinyLayer):
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
        fused = tuple(n for n, p in self.layer.named_parameters() if p.dim() >= 3 and id(p) not in conv_params)
        if fused:
            self.unsupported.append(f"3-D parameters ({', '.join(fused)}) in a layout transformers' experts "
                                    "decorator does not describe")
        experts = tuple(n for n, _ in expert_modules(self.layer))
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
        topk = any(op.name == "topk" for op in run.ops)
        for n, m in self.mods.items():
            if not n or list(m.children()) or isinstance(m, (nn.Linear, nn.Embedding, *_CONV)):
                continue
            dims = {p.dim() for p in m.parameters(recurse=False)}
            if 2 in dims:  # a matrix outside nn.Linear: transformers' router modules (F.linear on a weight)
                why = "router: its output picks experts (kept in float, as vLLM does)" if topk else \
                    "not an nn.Linear: kept in float"
                self.unquantized.append(Unquantized(n, why))
            elif 1 in dims:
                self.unquantized.append(Unquantized(n, "norm: kept in float"))
        units = tuple(self._unit(n) for n in self.quant)
        if not units and not experts:
            self.unsupported.append("it has no nn.Linear to quantize (e.g. GPT-2's Conv1D projections)")
        graph = LayerGraph(
            layer_class=type(self.layer).__name__, units=units, groups=groups, readers=readers, writers=writers,
            unquantized=tuple(self.unquantized), unsupported="; ".join(self.unsupported) or None, experts=experts)
        if graph.rotatable:
            graph = self._verify_rotation(graph)
        return replace(graph, resume=self._resume())

    def _grads(self, sink: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """Which output channels of each Linear in ``names`` influence ``sink``."""
        outs = [self.out[n] for n in names]
        if not outs:
            return {}
        if not sink.requires_grad:
            return {n: torch.zeros(o.shape[-1], dtype=torch.bool) for n, o in zip(names, outs)}
        cot = torch.randn(sink.shape, dtype=sink.dtype, generator=self.t.gen)
        grads = torch.autograd.grad((sink * cot).sum(), outs, retain_graph=True, allow_unused=True)
        return {n: channel_mask(g, o.shape[-1]) for n, g, o in zip(names, grads, outs)}

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
            by_input.setdefault(tensor_key(self.inp[n]), []).append(n)
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
        if id(base_in) in self.resid or tensor_key(base_in) == tensor_key(self.base.input):
            return Producer(None, "unfoldable", reason="reads the residual stream directly (no norm before it)")
        found = None
        order = {c.name: c.order for c in reversed(self.base.calls)}
        for mod, a, b, kind, r, probe in probes:
            verdict, pi = flow(base_in, probe.first(key).input, r)
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
        cmap = channel_map(pi, a, heads)
        if cmap is None:
            return Producer(mod, "unfoldable", rows=(a, b),
                            reason="its channels reach the group through a map that is neither one-to-one nor "
                                   "a GQA head map")
        if kind == "norm":
            pkind = norm_weight_kind(self.mods[mod], b, self.t.gen)
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
        siblings = [n for n in self.quant if tensor_key(self.inp[n]) == tensor_key(self.inp[mod])]
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
        err = rel_err(got, self.base.output.detach())
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
        kind = norm_weight_kind(mod, dim, self.t.gen) if getattr(mod, "weight", None) is not None else "other"
        if kind == "unfoldable" or g is None:
            return ResidualReader(name, "other", reason="not a norm feeding Linears directly")
        consumers = tuple(g.linears)
        if not rotation_invariant(mod, kind, dim, self.t.gen):
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
        err = rel_err(got, self.base.output.detach() @ q)
        if err <= EXACT_RTOL:
            return graph
        why = f"rotating the stream changes the layer's output (relative error {err:.1e} on a float64 instance)"
        return replace(graph, readers=tuple(replace(r, rotatable=False, reason=why) for r in graph.readers))

    # -- resuming after the attention block
    def _resume(self) -> Resume | None:
        """The residual the layer's second block reads, if the layer's output follows from it
        alone with every module called before that block (its input norm, the attention, a
        post-norm) returning zeros: confirmed on the instance, else None (a parallel block,
        as Cohere's, has no such residual)."""
        run = self.base
        top = [c for c in run.calls if c.depth == 0]
        reader = next((c for c in top if c.input is not None and id(c.input) in self.resid
                       and c.input is not run.input and not isinstance(self.mods[c.name], nn.Linear)), None)
        if reader is None or len(run.calls_of(reader.name)) != 1 or reader.input.shape != run.input.shape:
            return None
        skipped = tuple(c.name for c in top if c.order < reader.order)
        returns = self._layouts(skipped)
        if returns is None:
            return None
        before = tuple(n for n in self.quant if run.calls_of(n)[0].order < reader.order)
        resume = Resume(reader.name, skipped, returns, before)
        layer = copy.deepcopy(self.layer)
        with resumed(layer, resume), torch.no_grad():
            got = self.t.run(layer, x=reader.input.detach()).output
        return resume if rel_err(got, self.base.output.detach()) <= EXACT_RTOL else None

    def _layouts(self, names: tuple[str, ...]) -> tuple[tuple[bool, ...] | None, ...] | None:
        """Each module's output layout (``Resume.returns``: a tensor shaped as its input, or a
        tuple whose elements so shaped are the ones zeroed, the others, such as eager
        attention's weights, None); None if one returns anything else."""
        outs: dict[str, object] = {}
        handles = [self.mods[n].register_forward_hook(lambda _m, _a, o, n=n: outs.setdefault(n, o)) for n in names]
        try:
            with torch.no_grad():
                self.t.run()
        finally:
            for h in handles:
                h.remove()
        layouts: list[tuple[bool, ...] | None] = []
        for n in names:
            o, shape = outs.get(n), self.base.first(n).input.shape
            if isinstance(o, torch.Tensor) and o.shape == shape:
                layouts.append(None)
            elif isinstance(o, tuple):
                layouts.append(tuple(isinstance(v, torch.Tensor) and v.shape == shape for v in o))
            else:
                return None
        return tuple(layouts)

    # -- units
    def _unit(self, n: str) -> Unit:
        lin = self.mods[n]
        segs = tuple(Segment(self.roles.get((n, i), "other"), a, b) for i, (a, b) in enumerate(self.segments[n]))
        return Unit(n, f"{n}.weight", lin.in_features, lin.out_features, segs, bias=lin.bias is not None)


def derive_layer_graph(decoder: nn.Module, layers_attr: str, index: int) -> LayerGraph:
    """The graph of layer ``index`` of ``decoder`` (the meta text model), cached per config
    and layer structure: an 80-layer model derives once per distinct layer type."""
    real = getattr(decoder, layers_attr)[index]
    cfg = decoder.config
    key = (type(cfg).__name__, _config_key(cfg), signature(real))
    if key in _CACHE:
        return _CACHE[key]
    began = time.perf_counter()
    modes = MODES if int(cfg.hidden_size) > 256 else ("real",)
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


def _config_key(cfg) -> str:
    """The config's fields that can shape a layer: not where it was read from, so validation
    (config.json as a dict) and the run (the downloaded folder) derive once between them, nor
    the dtype the skeleton was built in (the instance is float64 whatever it is, and a CPU run
    builds its skeleton in float32 where validation read bfloat16)."""
    fields = cfg.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(volatile, None)
    return json.dumps(fields, sort_keys=True, default=str)


def _derive_tiny(decoder: nn.Module, layers_attr: str, index: int, real: nn.Module,
                 modes: tuple[str, ...]) -> LayerGraph:
    graph = _failed(real, "no attempt")
    for mode in modes:
        try:
            tiny = TinyLayer(decoder, layers_attr, index, mode)
            graph = _Deriver(tiny).derive()
            if tiny.experts is not None:
                graph = expand_experts(graph, tiny.real_experts)
            graph = realize(graph, real, tiny)
            break
        except Exception as e:  # any failure, of the rules or of the model's own code on the instance
            why = str(e) if isinstance(e, DerivationError) else f"{type(e).__name__}: {e}"
            graph = _failed(real, why)
            log.debug("layer graph in mode %s failed (%s)", mode, why)
    return graph


def _failed(real: nn.Module, why: str) -> LayerGraph:
    return LayerGraph(type(real).__name__, (), (), unsupported=f"its graph cannot be derived ({why})")


def _renamed(name: str, e: int) -> str:
    hit = expert_of(name)
    if hit is None:
        return name
    container, _ = hit
    return f"{container}.{e}.{name[len(container) + 1:].partition('.')[2]}"


def _expand(names: tuple[str, ...], n: int) -> list[tuple[str, ...]]:
    """The real layer's counterparts of ``names`` (a group, a fused set) from the instance,
    whose few experts stand for ``n``: one tuple per expert when it belongs to one expert
    (expert 0's, renamed; the other instance experts' are dropped), one tuple with every
    expert's names in place of the instance's when it spans several experts (all experts
    reading one tensor), ``names`` itself when it holds no expert."""
    indices = {hit[1] for hit in map(expert_of, names) if hit is not None}
    if not indices:
        return [names]
    if len(indices) == 1:
        return [tuple(_renamed(x, e) for x in names) for e in range(n)] if indices == {0} else []
    first = [x for x in names if (hit := expert_of(x)) is not None and hit[1] == 0]
    out: list[str] = []
    for x in names:
        hit = expert_of(x)
        if hit is None:
            out.append(x)
        elif x == first[0]:
            out.extend(_renamed(y, e) for e in range(n) for y in first)
    return [tuple(out)]


def expand_experts(graph: LayerGraph, n: int) -> LayerGraph:
    """The graph of a layer with ``n`` experts from its instance's few: every expert is a copy
    of expert 0's units and groups, renamed (experts are identical up to their index)."""
    units: list[Unit] = []
    first = next((u for u in graph.units if (hit := expert_of(u.name)) is not None and hit[1] == 0), None)
    block = [u for u in graph.units if (hit := expert_of(u.name)) is not None and hit[1] == 0]
    for u in graph.units:
        if expert_of(u.name) is None:
            units.append(u)
        elif u is first:
            units.extend(replace(b, name=_renamed(b.name, e), param=_renamed(b.param, e))
                         for e in range(n) for b in block)
    groups: list[InputGroup] = []
    for g in graph.groups:
        expanded = _expand(g.linears, n)
        fused_sets = [(f, set(f)) for s in g.fused for f in _expand(s, n)]
        for i, linears in enumerate(expanded):
            e = i if len(expanded) > 1 else 0
            p = g.producer
            if p.module is not None:
                p = replace(p, module=_renamed(p.module, e))
            members = set(linears)
            fused = tuple(f for f, names in fused_sets if names <= members)
            groups.append(InputGroup(linears, p, fused))
    readers = tuple(replace(r, consumers=_expand(r.consumers, n)[0] if r.consumers else ()) for r in graph.readers)
    writers = tuple(w for w in graph.writers if expert_of(w.module) is None or expert_of(w.module)[1] == 0)
    return replace(graph, units=tuple(units), groups=tuple(groups), readers=readers, writers=writers)
