"""LayerwiseEngine: stream a model through its quantizer one decoder layer at a time.

Only one decoder layer's weights, the calibration hidden states and (when evaluating) two
evaluation streams live on the device. Each layer is: loaded from the shards, measured on the
base evaluation stream, quantized against the calibration stream, saved to the work folder,
switched to its fake-quantized weights, and run again to produce the next layer's inputs, so
error propagates as it will at inference. Base and quantized perplexity come out of the same pass,
which is what makes evaluating a model larger than memory possible.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from . import seeding
from .activations import attach_activation_quantizers
from .distributed import SINGLE, World
from .divergence import compare_streams
from .errors import DeviceMemoryError, NumericsError
from .finite_check import check_quantized, check_written
from .graph.attention import observe_attention
from .graph.experts import UnfusedExperts, all_experts, expert_modules, expert_of, reset_counts, routed_counts
from .graph.resume import resumed
from .graph.runtime import LayerInputs, ModelRunner
from .graph.types import LayerGraph
from .moe import (ExpertCalibration, ExpertReport, expert_owners, rtn_fallback, starved, statistics_budget,
                  statistics_chunks, statistics_tokens, without)
from .quantizers.base import ATTENTION_KEY, ATTENTION_VALUE, InputHook, Joined, PairedStatistic, Quantizer, Statistic
from .scheme import QuantizedWeight
from .workdir import LayerRecord, WorkDir

log = logging.getLogger(__name__)

LayerCallback = Callable[[int, nn.Module, Mapping[str, QuantizedWeight]], None]
RecordHandOff = Callable[[int, LayerRecord], None]


def make_batches(seqs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack sequences of equal length into ``[b, L]`` batches (no padding, no masks)."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    return [torch.stack(group[i:i + batch_size]) for _, group in sorted(by_len.items())
            for i in range(0, len(group), batch_size)]


class _LayerCalibration:
    """The LayerCalibration the quantizers see: runs the float layer over this rank's
    calibration batches, each with the arguments the model's own forward gives layer ``index``.

    A MoE expert's statistics live on its owner rank alone (``owners``, decided before any
    statistic): a statistic of an expert's Linear that carries the owner as its ``owner`` is
    fed on the owner with its own tokens during the pass, then with every other rank's tokens
    reaching that expert (each rank's recorded block inputs, broadcast in turn after the pass,
    run through the owner's experts alone); it is never reduced. Every other statistic is fed
    on every rank and reduced. Paired statistics (the quantized stream beside the float one)
    are split alike, each stream's block inputs recorded. On one rank there is no other
    rank's tokens to replay: the same code, every expert owned.

    A stream whose later passes read only the layer's second block (the layer graph's
    ``resume``) keeps, in place of each batch's input, the residual that block reads, taken in
    the pass where the attention last mattered: every later forward of that stream, the
    propagation after quantization included, starts there (``resumed``)."""

    def __init__(self, runner: ModelRunner, index: int, layer: nn.Module, batches: list[LayerInputs], seed: int,
                 world: World = SINGLE, every_expert: bool = True, float_batches: list[LayerInputs] | None = None,
                 owners: Mapping[tuple[str, int], int] | None = None):
        self.runner, self.index, self.layer, self.batches, self.seed = runner, index, layer, batches, seed
        self.world, self.every_expert, self.float_batches = world, every_expert, float_batches
        self.owners = dict(owners or {})
        # Tokens routed to each expert over every rank's batches, from the first pass.
        self.routed: dict[str, list[int]] | None = None
        self._tokens: int | None = None
        # A sequential quantizer's quantized weights for the quantized stream, and the float
        # weights they replace, copied once (the layer's own are float outside a pass).
        self._substitutes: dict[str, torch.Tensor] = {}
        self._floats: dict[str, torch.Tensor] = {}
        # The float stream's batches already hold this layer's outputs (its last pass ran them whole).
        self.float_carried = False
        self.resume = runner.graph.layer(index).resume
        # Whether each stream's batches (quantized, float) hold the residual ``resume.reader`` reads.
        self.resumed = [False, False]
        # Substituted Linears whose inputs the served model quantizes: the quantized stream does
        # not, so their block's output there is not the served one.
        self._inputs_quantized: set[str] = set()
        self._fed: set[str] = set()  # every name a pass over this layer fed so far

    def generator(self, name: str) -> torch.Generator:
        return seeding.generator(self.seed, self.index, name, device=self.runner.device)

    def expert_owner(self, name: str) -> int | None:
        hit = expert_of(name)
        return None if hit is None else self.owners.get(hit)

    def substitute(self, weights: Mapping[str, QuantizedWeight]) -> None:
        graph = self.runner.graph.layer(self.index)
        with torch.no_grad():
            for name, qw in weights.items():
                w = graph.unit(name).matrix(self.layer)
                self._floats.setdefault(name, w.clone())
                self._substitutes[name] = qw.dequantize(w.dtype)
                if qw.scheme.input_activations is not None:
                    self._inputs_quantized.add(name)

    def _forward(self, batches: list[LayerInputs], quantized: bool = True, carry: bool = False) -> Callable[[], None]:
        """Run ``batches`` through the layer; their outputs dropped as they come (activations
        stay on the device once), or with ``carry`` each output put in place of its input."""
        def forward() -> None:
            with _weights_in_place(self.layer, self.runner.graph.layer(self.index),
                                   self._substitutes if quantized else {}, self._floats), \
                    self.starting(self.layer, quantized):
                for b in batches:
                    out = self.runner.run_layer(self.layer, b.hidden, b.calls[self.index])
                    if carry:
                        b.hidden = out

        return forward

    def starting(self, layer: nn.Module, quantized: bool) -> contextlib.AbstractContextManager:
        """``layer`` run on a stream's batches as they are: from the residual if resumed."""
        return resumed(layer, self.resume) if self.resumed[0 if quantized else 1] else contextlib.nullcontext()

    def observe(self, stats: Mapping[str, Statistic], later: Collection[str] = ()) -> None:
        self._observe(stats, None, later)
        if self.routed is None:
            self.routed = _summed_counts(routed_counts(self.layer), self.world)

    def observe_paired(self, stats: Mapping[str, PairedStatistic], later: Collection[str] = ()) -> None:
        if self.float_batches is None:
            raise RuntimeError("observe_paired needs the float stream: the quantizer must set needs_float_inputs")
        self._observe(stats, self.float_batches, later)

    def _resumes(self, fed: Collection[str], later: Collection[str], paired: bool) -> tuple[bool, bool]:
        """Whether this pass leaves each stream (quantized, float) at the resume point. Only
        once no later pass reads the first block; then the float stream unless this is its
        last pass (which runs it whole), and the quantized one once its first block is final:
        every Linear of it this layer quantizes substituted, none with inputs the served model
        quantizes, none fed by this pass."""
        if self.resume is None:
            return False, False
        early = set(self.resume.before) | {ATTENTION_KEY, ATTENTION_VALUE}
        if any(self.resumed) and early & set(fed):
            raise RuntimeError(f"layer {self.index}: a pass feeds {sorted(early & set(fed))} after a stream resumed "
                               "past them: an earlier pass's ``later`` did not name them")
        if early & set(later):
            return False, False
        take_float = paired and bool(later) and not self.resumed[1]
        final = not early & (set(fed) | self._inputs_quantized) and early & self._fed <= set(self._substitutes)
        return bool(self._substitutes) and final and not self.resumed[0], take_float

    def _taking(self, batches: list[LayerInputs], take: bool) -> dict[str, InputHook]:
        """An input hook putting the residual the resume point reads in place of each batch's
        input, for a forward over ``batches`` in their order (the reader runs once a batch)."""
        if not take:
            return {}
        left = iter(batches)

        def tap(x: torch.Tensor) -> None:
            b = next(left)
            b.hidden = x.reshape(b.hidden.shape).clone()

        return {self.resume.reader: tap}

    def _observe(self, stats: Mapping[str, Statistic | PairedStatistic],
                 float_batches: list[LayerInputs] | None, later: Collection[str] = ()) -> None:
        """One pass over this rank's batches (with ``float_batches``, each batch on both
        streams, the float one first), then every owned statistic fed the recorded tokens of
        its block, then every other statistic reduced. ``later``: the Linears later passes
        over this layer feed. The last paired pass over a dense layer runs the float stream
        whole and leaves its outputs in ``float_batches``: the engine then does not run the
        float layer once more to carry that stream on. (A MoE layer's passes route every token
        to every expert, so their outputs are not the layer's.)"""
        paired = float_batches is not None
        blocks = dict(expert_modules(self.layer))
        shared, owned = self._split(stats)
        mine = {n: parts for n, parts in owned.items() if self.expert_owner(n) == self.world.rank}
        # Under routed calibration each stream's router picks its own tokens for an expert, so
        # the hooks of a paired pass would pair different tokens: an expert's owner pairs its
        # own tokens from the recorded calls too, each token's two inputs, routed as the
        # quantized stream routes it (the served model's routing).
        own_recorded = paired and not self.every_expert
        # Blocks whose experts' statistics recorded tokens must reach (the same on every rank).
        replayed = sorted({expert_of(n)[0] for n in owned}) if self.world.size > 1 or own_recorded else []
        fed = {**shared, **{n: shared.get(n, []) + ([] if own_recorded else mine[n]) for n in mine}}
        calls: dict[str, tuple[list, list]] = {b: ([], []) for b in replayed}  # quantized, float stream

        def recording(forward: Callable[[], None], stream: int) -> Callable[[], None]:
            def run() -> None:
                for b in replayed:
                    blocks[b].recorded = calls[b][stream]
                forward()

            return run

        # A pass ends at the last input it needs (a sequential quantizer's first stage needs only
        # the normed input: two whole forwards a layer saved with input feedback), unless it
        # feeds an expert (an expert's Linear may be called in chunks) or is a MoE layer's first
        # pass, which runs whole to count the routing.
        stop = (bool(self._substitutes) or not blocks) and not any(expert_of(n) for n in fed)
        carry = paired and not later and not blocks
        take_quant, take_float = self._resumes(stats, later, paired)
        self._fed.update(stats)
        reset_counts(self.layer)
        hooks = _fan_out(fed)
        try:
            with all_experts(self.layer, self.every_expert):
                if paired:
                    for quant, flt in zip(self.batches, float_batches):
                        run_paired_batch(self.layer, hooks, recording(self._forward([quant]), 0),
                                         recording(self._forward([flt], quantized=False, carry=carry), 1), stop,
                                         float_whole=carry, quant_taps=self._taking([quant], take_quant),
                                         float_taps=self._taking([flt], take_float))
                    self.float_carried = carry
                    self.resumed[1] = (self.resumed[1] or take_float) and not carry
                elif stop:
                    for b in self.batches:
                        run_calibration(self.layer, {**hooks, **self._taking([b], take_quant)}, self._forward([b]),
                                        stop_early=True)
                else:
                    run_calibration(self.layer, {**hooks, **self._taking(self.batches, take_quant)},
                                    recording(self._forward(self.batches), 0))
                self.resumed[0] = self.resumed[0] or take_quant
                for b in replayed:
                    self._replay(b, blocks[b], {n: parts for n, parts in mine.items() if expert_of(n)[0] == b},
                                 calls.pop(b)[:2 if paired else 1], own_recorded)
        finally:
            for m in blocks.values():
                m.recorded = None
        for name in sorted(shared):  # the same order on every rank: collectives pair up
            for s in shared[name]:
                s.reduce(self.world)

    def _split(self, stats: Mapping[str, Statistic | PairedStatistic]) -> tuple[dict[str, list], dict[str, list]]:
        """``stats`` (``Joined`` taken apart) as those every rank feeds and reduces, and those
        an expert's owner alone feeds, with every rank's tokens (``owner`` set to the expert's
        owner); each maps a Linear to its statistics."""
        shared: dict[str, list] = {}
        owned: dict[str, list] = {}
        for name, stat in stats.items():
            owner = self.expert_owner(name)
            for s in _parts(stat):
                alone = owner is not None and getattr(s, "owner", None) == owner
                (owned if alone else shared).setdefault(name, []).append(s)
        return shared, owned

    def _replay(self, name: str, block: UnfusedExperts, mine: Mapping[str, list],
                calls: tuple[list, ...], own_too: bool) -> None:
        """Feed this rank's experts of ``block`` (``mine``: their statistics) every other rank's
        tokens (``own_too``: this rank's as well), from each stream's recorded calls (``calls``:
        the quantized stream's, then the float stream's for paired statistics): each rank in
        turn broadcasts the block's recorded inputs, which the others run through each of their
        experts alone, call by call as the pass made them, a pair of streams routed as the
        quantized one. One rank's inputs are on a device at a time (its share of the tokens x
        hidden, 16 bits, once per stream, with each token's routing: its top-k experts, or
        Llama 4's router logits over every expert)."""
        width = block.layout.hidden
        quant = calls[0]

        def rows_of(stream: list) -> torch.Tensor:
            return torch.cat([h.reshape(-1, width) for h, _ in stream]) if stream else \
                torch.zeros(0, width, device=self.runner.device, dtype=self.runner.dtype)

        def routing_of(stream: list) -> torch.Tensor:  # no call: no row is ever read, any width does
            return torch.cat([r for _, r in stream]) if stream else torch.zeros(0, 1, device=self.runner.device)

        recorded = {"hidden": rows_of(quant), "routing": routing_of(quant)}
        if len(calls) > 1:
            recorded["float"], recorded["float_routing"] = rows_of(calls[1]), routing_of(calls[1])
        sizes = [r.shape[0] for _, r in quant]
        del calls, quant
        experts = sorted({expert_of(n)[1] for n in mine})
        hooks = _fan_out({n[len(name) + 1:]: parts for n, parts in mine.items()})
        # The quantized stream's tokens run through the experts as that stream's passes do: a
        # sequential quantizer's substituted experts (gate/up before their down_proj's stage).
        graph = self.runner.graph.layer(self.index)
        substituted: dict[int, dict[str, torch.Tensor]] = {}  # this block's, by expert
        for n, w in self._substitutes.items():
            hit = expert_of(n)
            if hit is not None and hit[0] == name:
                substituted.setdefault(hit[1], {})[n] = w

        def quantized(e: int | None = None) -> contextlib.AbstractContextManager:
            weights = substituted.get(e, {}) if e is not None else {n: w for ws in substituted.values()
                                                                   for n, w in ws.items()}
            return _weights_in_place(self.layer, graph, weights, self._floats)

        def run_quantized(e: int, x: torch.Tensor) -> None:
            with quantized(e):
                block.run_expert(e, x)

        # A pair of streams is fed expert by expert: one expert's float inputs wait for its
        # quantized ones, not every owned expert's (128 of DeepSeek-V3's down_proj inputs for a
        # batch of 16k tokens: 8.6 GB).
        of_expert = {e: {n: h for n, h in hooks.items() if int(n.split(".", 1)[0]) == e} for e in experts}
        for src in range(self.world.size):
            here = src == self.world.rank
            theirs, meta = self.world.broadcast(recorded if here else None, src, {"rows": sizes} if here else None)
            if here and not own_too:  # this rank's own tokens were fed during the pass
                continue
            at = 0
            for rows in meta["rows"]:
                span = slice(at, at + rows)
                at += rows
                routing = theirs["routing"][span]
                quant = block.expert_inputs(experts, theirs["hidden"][span], routing)
                if "float" not in theirs:
                    with quantized():
                        run_calibration(block, hooks, lambda q=quant: _run_experts(block, q))
                    continue
                flt = block.expert_inputs(experts, theirs["float"][span], theirs["float_routing"][span], routing)
                for (e, xq), (_, xf) in zip(quant, flt):
                    run_paired_batch(block, of_expert[e], lambda e=e, x=xq: run_quantized(e, x),
                                     lambda e=e, x=xf: block.run_expert(e, x))
            del theirs

    @property
    def tokens(self) -> int:
        """Calibration tokens over every rank."""
        if self._tokens is None:
            mine = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in self.batches)
            self._tokens = int(self.world.all_reduce(torch.tensor([mine], device=self.world.device)).item())
        return self._tokens


@contextlib.contextmanager
def _weights_in_place(layer: nn.Module, graph: LayerGraph, weights: Mapping[str, torch.Tensor],
                      floats: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``layer`` with these Linears' weights in place of its own while inside; its own
    (``floats``, copies of them) put back after, bit for bit."""
    with torch.no_grad():
        for name, w in weights.items():
            graph.unit(name).matrix(layer).copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for name in weights:
                graph.unit(name).matrix(layer).copy_(floats[name])


def _run_experts(block: UnfusedExperts, inputs: Iterable[tuple[int, torch.Tensor]]) -> None:
    for e, x in inputs:
        block.run_expert(e, x)


def _parts(stat: Statistic) -> list[Statistic]:
    """The statistics a ``Joined`` fans out to (each may live elsewhere), or ``stat`` itself."""
    return [p for s in stat.stats for p in _parts(s)] if isinstance(stat, Joined) else [stat]


def _fan_out(stats: Mapping[str, list[Statistic]]) -> dict[str, InputHook]:
    """One input hook per Linear feeding all its statistics (``Joined`` again, over the parts
    this rank feeds)."""
    return {n: parts[0].add if len(parts) == 1 else Joined(*parts).add for n, parts in stats.items() if parts}


def _summed_counts(counts: dict[str, list[int]], world: World) -> dict[str, list[int]]:
    """Per-expert routed token counts summed over the ranks, so every rank takes the same
    decisions from them (which experts fall back to round-to-nearest)."""
    names = sorted(counts)
    if world.size == 1 or not names:
        return counts
    flat = torch.tensor([c for n in names for c in counts[n]], dtype=torch.int64, device=world.device)
    world.all_reduce(flat)
    out, at = {}, 0
    for n in names:
        out[n] = flat[at:at + len(counts[n])].tolist()
        at += len(counts[n])
    return out


def run_paired_batch(layer: nn.Module, hooks: Mapping[str, Callable[[torch.Tensor, torch.Tensor], None]],
                     quant: Callable[[], None], flt: Callable[[], None], stop_early: bool = False,
                     float_whole: bool = False, quant_taps: Mapping[str, InputHook] | None = None,
                     float_taps: Mapping[str, InputHook] | None = None) -> None:
    """One batch through ``layer`` on the float stream (each hooked Linear's input kept; with
    ``float_whole`` never stopped early), then on the quantized stream (each hook called with
    both inputs of the same tokens); each stream's ``taps`` are input hooks of its own."""
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in hooks}
    run_calibration(layer, {**{n: kept[n].append for n in hooks}, **(float_taps or {})}, flt,
                    stop_early and not float_whole)
    run_calibration(layer, {**{n: (lambda x, n=n: hooks[n](x, kept[n].pop(0))) for n in hooks}, **(quant_taps or {})},
                    quant, stop_early)


class _InputsTaken(Exception):
    """Every hooked input of the batch was seen: the rest of the layer's forward feeds nothing."""


def run_calibration(layer: nn.Module, hooks: Mapping[str, InputHook], forward: Callable[[], object],
                    stop_early: bool = False) -> None:
    """Call ``forward()`` (every calibration batch through ``layer``) with ``hooks`` attached:
    Linear names get their input, the attention names what ``layer``'s attention receives.

    With ``stop_early`` (``forward`` runs one batch, and each hook is called once for it) the
    forward stops as soon as every hook had its input: no pass reads the layer's output, and a
    sequential quantizer's stages read inputs early in the layer."""
    if stop_early and hooks:
        left = set(hooks)

        def last_stops(name: str, fn: InputHook) -> InputHook:
            def hook(*x: torch.Tensor) -> None:
                fn(*x)
                left.discard(name)
                if not left:
                    raise _InputsTaken
            return hook

        hooks = {n: last_stops(n, fn) for n, fn in hooks.items()}
    try:
        _run_hooked(layer, hooks, forward)
    except _InputsTaken:
        pass


def _run_hooked(layer: nn.Module, hooks: Mapping[str, InputHook], forward: Callable[[], object]) -> None:
    inside = {id(m) for m in layer.modules()}
    handles = [
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, fn=fn: fn(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, fn in hooks.items() if name not in (ATTENTION_KEY, ATTENTION_VALUE)
    ]
    seen = {k: hooks[k] for k in (ATTENTION_KEY, ATTENTION_VALUE) if k in hooks}

    def on_attention(module, query, key, value):
        if id(module) in inside:
            for k, fn in seen.items():
                fn(key if k == ATTENTION_KEY else value)

    try:
        with torch.no_grad(), (observe_attention(on_attention) if seen else contextlib.nullcontext()):
            forward()
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class EngineResult:
    perplexity_base: float | None = None
    perplexity_quantized: float | None = None
    # KL of the quantized next-token distribution from the base's, top-1 agreement (divergence.py).
    divergence: dict[str, float | int] | None = None
    layer_seconds: list[float] = field(default_factory=list)
    experts: ExpertReport = field(default_factory=ExpertReport)
    # Seconds per stage summed over layers (load, quantize, save, propagate, ...); "export
    # hand-off": waiting for the previous layer's export (the export itself runs beside).
    phase_seconds: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Adds wall time per stage into ``phases``; on CUDA it synchronises at each stage end
    (a handful of syncs per layer) so a stage is charged for its own device work."""

    def __init__(self, phases: dict[str, float], device: torch.device):
        self.phases, self.sync = phases, device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[stage] = self.phases.get(stage, 0.0) + now - self.t
        self.t = now


ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Attention without cuDNN's: its first call for each attention shape builds an execution plan
(1.3-1.9 s on an H200, measured on Gemma-3-12B's shapes: once for the local layers, once for the
global), which every run pays, while flash and memory-efficient attention were as fast per
layer after that. The peer runs with PyTorch's default, cuDNN first."""


class LayerwiseEngine:
    """Quantizes layers ``start..n-1`` and replays ``0..start-1`` from the work folder.

    Every rank of ``world`` calibrates and propagates its share of the calibration batches and
    ends each layer with the same quantized weights; rank 0 alone evaluates and writes.
    ``on_record`` gets each layer's record in order, replayed ones included, as soon as it is
    final (the export; rank 0's alone)."""

    def __init__(self, runner: ModelRunner, quantizer: Quantizer, workdir: WorkDir, fingerprint: str,
                 quiet: bool = False, on_layer: LayerCallback | None = None, *, seed: int,
                 experts: ExpertCalibration = ExpertCalibration(), world: World = SINGLE,
                 on_record: RecordHandOff | None = None):
        self.sk, self.quantizer, self.workdir, self.fingerprint = runner, quantizer, workdir, fingerprint
        self.quiet, self.on_layer, self.seed, self.experts, self.world = quiet, on_layer, seed, experts, world
        self.on_record = on_record if world.is_main else None

    def run(self, calib: list[torch.Tensor], evaluation: list[torch.Tensor] | None, batch_size: int,
            start: int = 0) -> EngineResult:
        try:
            with sdpa_kernel(ATTENTION_BACKENDS):
                return self._run(calib, evaluation, batch_size, start)
        except torch.OutOfMemoryError:
            raise DeviceMemoryError(
                "out of device memory", field="calibration.batch_size",
                hint="lower calibration.num_samples, calibration.max_seq_length or calibration.batch_size "
                "(activations of all samples stay on the device)") from None

    def _run(self, calib: list[torch.Tensor], evaluation: list[torch.Tensor] | None, batch_size: int,
             start: int) -> EngineResult:
        sk, result = self.sk, EngineResult()
        calib_batches = self.world.shard(make_batches(calib, batch_size))
        eval_batches = make_batches(evaluation, batch_size) if evaluation and self.world.is_main else []
        clock = _Clock(result.phase_seconds, sk.device)
        # The model's own forward embeds every batch and gives each layer its arguments; the
        # embedding is on the device only while it does.
        calib_in = sk.capture(calib_batches)
        base_in = sk.capture(eval_batches)
        quant_in = [LayerInputs(b.hidden.clone(), b.calls) for b in base_in]
        # The float model's calibration stream, for quantizers that fit the quantized layer on
        # its own inputs to the float layer on the float inputs.
        float_in = [LayerInputs(b.hidden.clone(), b.calls) for b in calib_in] \
            if self.quantizer.needs_float_inputs else None
        clock.lap("embed")

        if start:
            log.info("resuming: replaying %d finished layers from %s", start, self.workdir.root)
        bar = tqdm(range(sk.num_layers), desc="quantizing layers", unit="layer",
                   disable=self.quiet or not self.world.is_main)
        for i in bar:
            began = time.perf_counter()
            layer = sk.load_layer(i)
            if i >= start:
                sk.check_finite(layer, i)
            clock.lap("load")
            with torch.no_grad():
                for b in base_in:
                    b.hidden = sk.run_layer(layer, b.hidden, b.calls[i])
            clock.lap("evaluate")
            calib: _LayerCalibration | None = None
            if i < start:
                record = self.workdir.load_layer(i)
            else:
                qweights, calib = self._quantize(i, layer, calib_in, float_in, result.experts)
                for name, qw in qweights.items():
                    check_quantized(sk.layer_prefix(i) + name, qw)
                clock.lap("quantize")
                quantized = {f"{name}.weight" for name in qweights}
                floats = {k: v.detach().clone() for k, v in layer.state_dict().items() if k not in quantized}
                record = LayerRecord(floats, dict(qweights), self.quantizer.extra_tensors())
                for name, t in {**record.floats, **record.extra}.items():  # folded norms, KV scales
                    check_written(sk.layer_prefix(i) + name, t)
                if self.world.is_main:
                    self.workdir.save_layer(i, record, self.fingerprint)
                clock.lap("save")
            if self.on_record is not None:
                self.on_record(i, record)
                clock.lap("export hand-off")
            # The layer is still float here (folds leave its function as it was).
            if float_in is not None and not (calib and calib.float_carried):
                with torch.no_grad(), calib.starting(layer, quantized=False) if calib else contextlib.nullcontext():
                    for b in float_in:
                        b.hidden = sk.run_layer(layer, b.hidden, b.calls[i])
            apply_record(layer, record, sk.device, sk.dtype)
            if self.on_layer is not None and i >= start:
                self.on_layer(i, layer, record.quantized)
            with torch.no_grad():
                # Batch by batch in place: each input is freed as its output appears, so the
                # activations are on the device once, not twice (2 GiB for 128 x 2048 at 4096 wide).
                with calib.starting(layer, quantized=True) if calib else contextlib.nullcontext():
                    for b in calib_in:
                        b.hidden = sk.run_layer(layer, b.hidden, b.calls[i])
                for b in quant_in:
                    b.hidden = sk.run_layer(layer, b.hidden, b.calls[i])
            _check_finite_list([b.hidden for b in calib_in], f"outputs of layer {i} on calibration data", sk.dtype)
            _check_finite_list([b.hidden for b in quant_in], f"outputs of layer {i} on evaluation data", sk.dtype)
            clock.lap("propagate")
            del layer, record
            if i >= start:
                result.layer_seconds.append(time.perf_counter() - began)

        if eval_batches:
            # The model's own head (final norm, lm_head, softcap) gives the logits, a chunk of
            # positions at a time: a batch's whole logits are GBs at a 128k-262k vocabulary.
            streams = tqdm(zip(base_in, quant_in, eval_batches), total=len(eval_batches), desc="comparing logits",
                           unit="batch", disable=self.quiet)
            compared = compare_streams(((b.hidden[:, :-1], q.hidden[:, :-1], t[:, :-1], t[:, 1:])
                                        for b, q, t in streams), sk.logits, sk.text_config.vocab_size)
            sk.release()
            result.perplexity_base, result.perplexity_quantized = compared.perplexity_base, compared.perplexity_quantized
            result.divergence = compared.divergence()
            clock.lap("evaluate")
        return result

    def _quantize(self, i: int, layer: nn.Module, calib_in: list[LayerInputs], float_in: list[LayerInputs] | None,
                  report: ExpertReport) -> tuple[dict[str, QuantizedWeight], _LayerCalibration]:
        """The quantizer on layer ``i``; for a Mixture-of-Experts layer, with the experts'
        calibration mode, their token counts recorded and starved experts rounded instead.
        Also the calibration, which says where each stream stands in the layer (whether
        ``float_in`` already left it, whether a stream holds the resumed residual)."""
        graph = self.sk.graph.layer(i)
        settings = self.experts
        owners = expert_owners(graph, self.world)
        calib = _LayerCalibration(self.sk, i, layer, calib_in, self.seed, self.world, settings.all_experts, float_in,
                                  owners)
        schemes = self.quantizer.layer_schemes(self.sk.layer_prefix(i), graph)
        if not graph.experts or not self.quantizer.needs_calibration:
            return self.quantizer.quantize_layer(layer, graph, calib, schemes), calib
        if not settings.all_experts:
            graph = graph.per_expert()
            calib.observe({})  # who is starved must be known before the quantizer hooks them
        counts = {n: statistics_tokens((calib.routed or {}).get(n, [0] * m.layout.num_experts), calib.tokens,
                                       settings) for n, m in expert_modules(layer)}
        where = self.sk.layer_prefix(i)[:-1]
        hungry = starved(counts, settings)
        qweights: dict[str, QuantizedWeight] = {}
        # Experts' statistics are held by their owners alone (paired ones too); the quantizer
        # says how many float32 [in, in] it keeps per input (GPTAQ: two).
        for part in statistics_chunks(without(graph, hungry), statistics_budget(self.sk.device, self.world), owners,
                                      len(self.quantizer.statistics)):
            qweights.update(self.quantizer.quantize_layer(layer, part, calib,
                                                          {n: schemes[n] for n in part.linears if n in schemes}))
        if hungry:
            report.rtn_fallback += [f"{where}.{n}" for n in
                                    rtn_fallback(layer, graph, hungry, self.quantizer.scheme, qweights, where)]
        for name, per in (calib.routed or {}).items():
            report.routed[f"{where}.{name}"] = per
            report.statistics_tokens[f"{where}.{name}"] = statistics_tokens(per, calib.tokens, settings)
        return qweights, calib


def apply_record(layer: nn.Module, record: LayerRecord, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``layer`` its quantized form: fake-quantized weights, its (possibly folded) floats,
    and its input activations quantized where the scheme says so.

    Fresh and resumed runs both go through here, so their next-layer inputs are bit-identical.
    """
    state = {k: v.to(device) for k, v in record.floats.items()}
    state.update({f"{name}.weight": qw.dequantize(dtype).to(device) for name, qw in record.quantized.items()})
    layer.load_state_dict(state, strict=True)
    attach_activation_quantizers(layer, record.quantized)


def perplexity(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """exp(mean next-token NLL) over every position of every batch.

    ``batches`` yields ``(logits, tokens)``: the logits of positions ``:-1`` of ``tokens``.
    A generator keeps one batch's logits in memory at a time.
    """
    nll, count = 0.0, 0
    with torch.no_grad():
        for logits, tokens in batches:
            target = tokens[:, 1:].to(logits.device)
            logits = logits.float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
    return math.exp(nll / count)


def _check_finite_list(ts: list[torch.Tensor], where: str, dtype: torch.dtype) -> None:
    if ts and not torch.isfinite(torch.stack([t.float().abs().amax() for t in ts])).all():
        advice = ("try model.dtype: bfloat16 or float32 instead of float16" if dtype == torch.float16
                  else "the layer's weights overflow even in this dtype; check the checkpoint")
        raise NumericsError(f"{where} contain NaN or Inf (computed in {str(dtype).replace('torch.', '')})",
                            field="model.dtype", value=str(dtype).replace("torch.", ""), hint=advice)
