"""Mixture-of-Experts experts as one small MLP of ``nn.Linear``s per expert.

transformers 5 holds a layer's experts as fused 3-D parameters (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) and describes their layout with the
``use_experts_implementation`` decorator: ``has_gate``, ``has_bias``, ``is_transposed`` (gpt-oss
stores ``[E, H, 2I]``), ``is_concatenated`` (gate rows then up rows, or interleaved), and the
class's own ``_apply_gate`` (gpt-oss clamps and adds one). ``unfuse_experts`` replaces every such
module of a model with ``UnfusedExperts``: expert ``e`` becomes ``experts.{e}.gate_proj``,
``up_proj`` and ``down_proj`` Linears, computed exactly as the fused module computes them
(its own ``_apply_gate`` on the same concatenated or interleaved rows).

That makes an expert an ordinary unit everywhere: the layer graph derives its groups and
producers, quantizers hook its Linears' inputs, and the export writes one tensor per expert,
which is how MoE checkpoints store them and what vLLM's MoE loaders read
(``expert_params_mapping``: ``experts.{e}.gate_proj`` / ``w1`` ...).

Llama 4's experts carry no decorator attributes and are called with router-scaled inputs
instead; ``InputWeightedExperts`` takes that call.

Calibration (``all_experts``): every token goes through every expert, so each expert's
statistics come from all tokens, while only the routed outputs, weighted by the router, reach
the layer's output. All experts then read the very same tensor: their gate/up Linears form one
input group and share one Hessian. With ``all_experts`` off an expert sees only its routed
tokens. Either way ``routed`` counts the tokens the router gave each expert.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules import module as hooks

from . import grouped
from .grouped import expert_spans, grouped_linear, grouped_takes

_EXPERT = re.compile(r"^(.*\.)?experts\.(\d+)\.")


@dataclass(frozen=True)
class ExpertLayout:
    """How the fused parameters hold each expert (transformers' decorator attributes)."""

    num_experts: int
    hidden: int
    intermediate: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate_proj", "up_proj", "down_proj") if self.has_gate else ("up_proj", "down_proj")


# Fused experts transformers writes without the decorator's attributes, their layout read off
# the module's own forward: Llama 4's ``bmm(x, gate_up_proj [E, H, 2I])`` chunked into gate then
# up halves, ``bmm(act(gate) * up, down_proj [E, I, H])``, no biases.
_UNDECORATED = {"Llama4TextExperts": dict(has_gate=True, has_bias=False, is_transposed=True, is_concatenated=True)}


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with the standard layout attributes (or one of
    ``_UNDECORATED``)."""
    described = type(module).__name__ in _UNDECORATED or (hasattr(module, "is_transposed")
                                                          and hasattr(module, "has_gate"))
    return described and isinstance(getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.dim() == 3


def layout_of(fused: nn.Module) -> ExpertLayout:
    attrs = _UNDECORATED.get(type(fused).__name__) or dict(
        has_gate=fused.has_gate, has_bias=fused.has_bias, is_transposed=fused.is_transposed,
        is_concatenated=getattr(fused, "is_concatenated", True))
    down = fused.down_proj
    e = down.shape[0]
    h, i = (down.shape[2], down.shape[1]) if attrs["is_transposed"] else (down.shape[1], down.shape[2])
    if getattr(fused, "has_post_expert_norm", False):
        raise NotImplementedError(f"{type(fused).__name__}: experts with a post-expert norm")
    return ExpertLayout(e, int(h), int(i), **{k: bool(v) for k, v in attrs.items()})


class ExpertLinear(nn.Linear):
    """An expert's Linear, its parameters left as allocated: they are always loaded afterwards
    or stay on the meta device, and the random init of nn.Linear (on meta too) of Qwen3-30B-A3B's
    18,432 expert Linears took 15 s of every validation and again of every run's model skeleton."""

    def reset_parameters(self) -> None:
        pass


class ExpertMLP(nn.Module):
    """One expert: ``gate_proj``/``up_proj`` ``[I, H]`` and ``down_proj`` ``[H, I]``."""

    def __init__(self, layout: ExpertLayout, device, dtype):
        super().__init__()
        kw = dict(bias=layout.has_bias, device=device, dtype=dtype)
        if layout.has_gate:
            self.gate_proj = ExpertLinear(layout.hidden, layout.intermediate, **kw)
        self.up_proj = ExpertLinear(layout.hidden, layout.intermediate, **kw)
        self.down_proj = ExpertLinear(layout.intermediate, layout.hidden, **kw)


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE block as ``ExpertMLP``s, called as the fused module is:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) → [T, H]``.

    With ``recorded`` a list, each call appends its ``(hidden_states, routing)`` (here the
    routing is ``top_k_index``): an expert's statistics can then be fed another rank's tokens
    by running that expert alone on them (``expert_inputs``, ``run_expert``)."""

    def __init__(self, fused: nn.Module):
        layout = layout_of(fused)
        p = fused.down_proj
        super().__init__([ExpertMLP(layout, p.device, p.dtype) for _ in range(layout.num_experts)])
        self.layout = layout
        # The fused module, kept for its activation and gate rule only (its 3-D parameters
        # are dropped; it is not a submodule, so no state_dict sees it).
        for name in list(fused._parameters):
            fused._parameters[name] = None
        self.__dict__["fused"] = fused
        self.all_experts = False
        self.routed: torch.Tensor | None = None
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def expert_inputs(self, experts: list[int], hidden: torch.Tensor, routing: torch.Tensor,
                      chosen: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Each of ``experts`` with what it computes on in a recorded call (``hidden`` ``[T, H]``
        and ``routing``, as ``recorded`` holds them): the rows of ``hidden``, every token under
        all-expert calibration, the tokens routed to it otherwise (in token order, as
        ``forward`` takes them; one host sync for all experts). ``chosen``: another call's
        routing that picks the tokens instead (a pair of streams routed as the quantized one)."""
        for e, token in self._expert_tokens(experts, routing if chosen is None else chosen):
            yield e, hidden if token is None else hidden[token]

    def _expert_tokens(self, experts: list[int],
                       routing: torch.Tensor) -> Iterator[tuple[int, torch.Tensor | None]]:
        """Each of ``experts`` with the tokens of a call it computes on: None for every token
        (all-expert calibration), else those ``routing`` gives it, in token order."""
        if self.all_experts:
            yield from ((e, None) for e in experts)
            return
        top_k_index = self._top_k_index(routing)
        counts = _expert_counts(top_k_index, self.layout.num_experts)
        wanted = set(experts)
        for e, token, _ in self._routed_pairs(top_k_index, counts)[1]:
            if e in wanted:
                yield e, token

    def _top_k_index(self, routing: torch.Tensor) -> torch.Tensor:
        """The experts a recorded call's ``routing`` picks for each token, ``[T, k]``."""
        return routing

    def _routed_pairs(self, idx: torch.Tensor,
                      counts: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, slice]]]:
        """``idx`` ``[T, k]``'s (token, slot) pairs as flat indices sorted by expert (each expert's
        in token order, what ``torch.where(idx == e)`` gives), and each picked expert with its
        tokens and its span of that order."""
        order, tokens, per_expert = self._sorted_pairs(idx, counts)
        runs, start = [], 0
        for e, count in enumerate(per_expert):
            if count:
                runs.append((e, tokens[start:start + count], slice(start, start + count)))
            start += count
        return order, runs

    def _sorted_pairs(self, idx: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``idx``'s pairs sorted by expert (``_routed_pairs``), the token of each, and each
        expert's number of pairs. The tokens of every pair come from one division and the
        experts' counts from one host sync: on a GPU the routed forward is launch-bound (a
        128-expert block calls 128 experts a batch), and each sync stalls the launch queue."""
        order = torch.argsort(idx.reshape(-1), stable=True)
        return order, order // idx.shape[1], counts.tolist()

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x`` ``[T, H]`` (unweighted), as ``forward`` runs it."""
        return self._expert(e, x)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m: ExpertMLP = self[e]
        return m.down_proj(self._gated(m.gate_proj(x) if self.layout.has_gate else None, m.up_proj(x)))

    def _gated(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """The down projection's input from the gate and up projections' outputs, as the fused
        module computes it: its activation on ``up`` without a gate, else its own ``_apply_gate``
        on the rows it holds (gate then up, or interleaved)."""
        if gate is None:
            return self.fused.act_fn(up)
        if self.layout.is_concatenated:
            both = torch.cat([gate, up], dim=-1)
        else:
            both = torch.stack([gate, up], dim=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])
        return type(self.fused)._apply_gate(self.fused, both)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        n = self.layout.num_experts
        idx = top_k_index.reshape(hidden_states.shape[0], -1)
        weights = top_k_weights.reshape(idx.shape).to(hidden_states.dtype)
        if self.recorded is not None:
            self.recorded.append((hidden_states, idx))
        if not hidden_states.is_meta:
            counts = _expert_counts(idx, n)
            self.routed = counts if self.routed is None else self.routed + counts
        out = torch.zeros_like(hidden_states)
        if self.all_experts:
            # Every expert on the same tensor (one input group, one Hessian); a dense [T, n]
            # routing matrix keeps only the routed outputs, weighted.
            dense = torch.zeros(idx.shape[0], n + 1, dtype=weights.dtype, device=weights.device)
            dense.scatter_add_(1, idx.clamp(max=n), weights)
            for e in range(n):
                out += self._expert(e, hidden_states) * dense[:, e:e + 1]
            return out
        if self._grouped(hidden_states):
            self._routed_grouped(hidden_states, idx, counts, weights, out)
            return out
        order, runs = self._routed_pairs(idx, counts)
        pair_weights = weights.reshape(-1)[order].unsqueeze(1)  # one gather for every expert's pairs
        for e, token, span in runs:
            y = self._expert(e, hidden_states[token]) * pair_weights[span]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _grouped(self, x: torch.Tensor) -> bool:
        """Whether the routed forward may compute the experts' Linears as grouped products:
        only where skipping their modules changes nothing (each a plain ``ExpertLinear`` with
        plain parameters, no hook on it nor any global module hook: the quantizers' statistics
        and activation fake-quant attach as hooks; no autograd through the kernel) and the
        kernel takes ``x``'s dtype and the widths on its device."""
        if (torch.is_grad_enabled() or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks
                or not grouped_takes(x, (self.layout.hidden, self.layout.intermediate))):
            return False
        # Checked on every call (a scheme may hook or replace a Linear at any time), so through
        # the modules' dicts: nn.Module.__getattr__ over 768 Linears took 3.6 ms a call, this 0.8.
        dtype, device = x.dtype, x.device
        for m in self._modules.values():
            for name in self.layout.projections:
                lin = m._modules[name]
                if (type(lin) is not ExpertLinear or lin._forward_hooks or lin._forward_pre_hooks
                        or lin._backward_hooks or lin._backward_pre_hooks):
                    return False
                for p in lin._parameters.values():
                    if p is not None and (type(p) is not nn.Parameter or p.dtype != dtype or p.device != device):
                        return False
        return True

    def _routed_grouped(self, hidden_states: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                        weights: torch.Tensor, out: torch.Tensor) -> None:
        """The routed forward by ``_grouped_runs``, each run's outputs weighted and added with one
        ``index_add_``: each token's outputs are still summed in expert order, so on CPU the
        result is bitwise the per-expert loop's (biased experts: see ``grouped_linear``). One
        host sync, as there."""
        order, tokens, per_expert = self._sorted_pairs(idx, counts)
        pairs = sum(per_expert)
        pair_weights = weights.reshape(-1)[order[:pairs]].unsqueeze(1)
        expert_of_row = idx.reshape(-1)[order[:pairs]] if self.layout.has_bias else None
        for lo, hi, y in self._grouped_runs(hidden_states[tokens[:pairs]], per_expert, counts, expert_of_row):
            out.index_add_(0, tokens[lo:hi], y.mul_(pair_weights[lo:hi]).to(out.dtype))  # in place: no 2nd copy

    def _grouped_runs(self, x: torch.Tensor, per_expert: list[int], counts: torch.Tensor,
                      expert_of_row: torch.Tensor | None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The experts on ``x``, every pair's input row sorted by expert (``per_expert`` rows
        each, ``counts`` on the device): each projection of a run of experts (``expert_spans``)
        as one grouped product, the gate rule once on the run's rows. Yields each run's span
        of rows and its outputs, unweighted. ``expert_of_row``: each row's expert, for biases."""
        ends = counts.cumsum(0)
        starts = [0]
        for count in per_expert:
            starts.append(starts[-1] + count)
        expert_bytes = sum(p.numel() * p.element_size() for p in self[0].parameters())
        for span in expert_spans(self.layout.num_experts, expert_bytes, grouped.GROUPED_CHUNK_BYTES):
            lo, hi = starts[span.start], starts[span.stop]
            if lo == hi:
                continue
            offs = (ends[span.start:span.stop] - lo).to(torch.int32)
            rows = None if expert_of_row is None else expert_of_row[lo:hi] - span.start
            mlps = [self[e] for e in span]

            def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
                return grouped_linear(inputs, [getattr(m, name) for m in mlps], offs, rows)

            xs = x[lo:hi]
            gate = project("gate_proj", xs) if self.layout.has_gate else None
            yield lo, hi, project("down_proj", self._gated(gate, project("up_proj", xs)).contiguous())


class InputWeightedExperts(UnfusedExperts):
    """Llama 4's experts, which its MoE block calls with ``routed_in`` ``[E * T, H]``: chunk
    ``e`` is every token scaled by its router score for expert ``e`` (zero where the router
    did not pick ``e``), so the router weight is applied to the expert's input, not its output
    (vLLM: ``apply_router_weight_on_input``). Every expert reads its own tensor: no two share
    statistics.

    The block does not hand the experts its router's choice, so a hook on the block's router
    (``watch``) keeps the router's input (the block's tokens ``[T, H]``) and logits ``[T, E]``
    for the experts' call. That pair is a call's routing and what it records (the block's
    input once, not ``routed_in``'s E scaled copies of it): the router's choice is the top-k
    of the logits, and an expert's input is a token scaled by the sigmoid of its logit, the
    very product the block computes for a routed token (``expert_inputs``). Under all-expert
    calibration each expert also sees the tokens routed elsewhere, scaled by the score the
    router would have given them (the same sigmoid); their outputs are dropped, as the
    block's zero input drops them."""

    def watch(self, router: nn.Module) -> None:
        self.top_k = int(router.top_k)
        # A bound method: a deep copy of the layer hooks the copy's router to the copy's experts.
        router.register_forward_hook(self._router_ran)

    def _router_ran(self, router: nn.Module, args: tuple, output) -> None:
        self.__dict__["_router"] = (args[0], output[1])

    def _top_k_index(self, routing: torch.Tensor) -> torch.Tensor:
        return torch.topk(routing, self.top_k, dim=1).indices  # the router's own choice

    def expert_inputs(self, experts: list[int], hidden: torch.Tensor, routing: torch.Tensor,
                      chosen: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """As ``UnfusedExperts.expert_inputs``, each row scaled by its score from ``routing``
        (the router logits of ``hidden``'s own call, also where ``chosen`` picks the tokens)."""
        scores = _scores(routing, hidden.dtype)
        for e, token in self._expert_tokens(experts, routing if chosen is None else chosen):
            yield e, hidden * scores[:, e:e + 1] if token is None else hidden[token] * scores[token, e:e + 1]

    def _gated(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        return self.fused.act_fn(gate) * up  # Llama4TextExperts.forward's own rule

    def forward(self, routed_in: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = self.layout.num_experts
        hidden, logits = self.__dict__.pop("_router")
        if self.recorded is not None:
            self.recorded.append((hidden, logits))
        chunks = routed_in.view(n, -1, routed_in.shape[-1])
        idx = self._top_k_index(logits)
        picked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
        if not routed_in.is_meta:
            counts = picked.sum(0)
            self.routed = counts if self.routed is None else self.routed + counts
        out = torch.zeros_like(chunks)
        if self.all_experts:
            would_be = _scores(logits, hidden.dtype)
            for e in range(n):
                x = torch.where(picked[:, e:e + 1], chunks[e], hidden * would_be[:, e:e + 1])
                out[e] = self._expert(e, x) * picked[:, e:e + 1]
            return out.view_as(routed_in)
        if self._grouped(routed_in):
            # Pair (token t, expert e) reads and writes row e * T + t of the flat chunks.
            order, tokens, per_expert = self._sorted_pairs(idx, counts)
            rows = idx.reshape(-1)[order] * chunks.shape[1] + tokens
            flat_out = out.view(-1, out.shape[-1])
            for lo, hi, y in self._grouped_runs(routed_in.view(-1, routed_in.shape[-1])[rows], per_expert, counts,
                                                None):
                flat_out.index_copy_(0, rows[lo:hi], y.to(out.dtype))
            return out.view_as(routed_in)
        for e in torch.nonzero(picked.any(0)).flatten().tolist():
            token = torch.nonzero(picked[:, e]).flatten()
            out[e].index_copy_(0, token, self._expert(e, chunks[e][token]).to(out.dtype))
        return out.view_as(routed_in)


def _expert_counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How many of ``idx``'s entries pick each of ``n`` experts; indices >= n (expert-parallel
    sentinels) are dropped. A scatter, not ``bincount``, which on CUDA waits for the device
    twice (its input's max and min) to size its output."""
    flat = idx.reshape(-1).long()
    counts = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    return counts.scatter_add_(0, flat.clamp(max=n), torch.ones_like(flat))[:n]


def _scores(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every token's router score for every expert ``[T, E]``, as Llama 4's router computes a
    picked one's (sigmoid in float32, cast back)."""
    return torch.sigmoid(logits.float()).to(dtype)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` (any device, meta included) with
    ``UnfusedExperts`` (Llama 4's with ``InputWeightedExperts``, watching its block's
    router); returns how many were replaced. Weights are not carried over: the model is a
    skeleton (meta) or is loaded afterwards."""
    found = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, fused in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(fused).__name__ == "Llama4TextExperts":
            unfused = InputWeightedExperts(fused)
            unfused.watch(parent.router)
        else:
            unfused = UnfusedExperts(fused)
        setattr(parent, leaf, unfused)
    return len(found)


def expert_modules(layer: nn.Module) -> Iterator[tuple[str, UnfusedExperts]]:
    for n, m in layer.named_modules():
        if isinstance(m, UnfusedExperts):
            yield n, m


@contextlib.contextmanager
def all_experts(layer: nn.Module, on: bool = True) -> Iterator[None]:
    """Run ``layer``'s experts on every token (``on``) or only on their routed tokens."""
    mods = [m for _, m in expert_modules(layer)]
    before = [m.all_experts for m in mods]
    for m in mods:
        m.all_experts = on
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.all_experts = b


def reset_counts(layer: nn.Module) -> None:
    for _, m in expert_modules(layer):
        m.routed = None


def routed_counts(layer: nn.Module) -> dict[str, list[int]]:
    """Tokens the router gave each expert since the last ``reset_counts``: experts module
    name (in ``layer``) → one count per expert (one host sync per MoE block)."""
    return {n: ([0] * m.layout.num_experts if m.routed is None else m.routed.tolist())
            for n, m in expert_modules(layer)}


def expert_of(name: str) -> tuple[str, int] | None:
    """``("mlp.experts", 3)`` for ``"mlp.experts.3.down_proj"``; None outside experts."""
    m = _EXPERT.match(name)
    return (f"{m.group(1) or ''}experts", int(m.group(2))) if m else None


def split_fused(layout: ExpertLayout, param: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused parameter (``gate_up_proj``, ``down_proj``, their ``_bias``) of one MoE block as
    per-expert tensors named relative to the experts module (``"3.up_proj.weight"``)."""
    bias = param.endswith("_bias")
    base = param[: -len("_bias")] if bias else param
    leaf = "bias" if bias else "weight"
    out: dict[str, torch.Tensor] = {}
    for e in range(layout.num_experts):
        w = t[e]
        if not bias and layout.is_transposed:
            w = w.transpose(0, 1)
        if base == "gate_up_proj":
            if layout.is_concatenated:
                gate, up = w[: layout.intermediate], w[layout.intermediate:]
            else:
                gate, up = w[0::2], w[1::2]
            out[f"{e}.gate_proj.{leaf}"] = gate.contiguous()
            out[f"{e}.up_proj.{leaf}"] = up.contiguous()
        else:
            out[f"{e}.{base}.{leaf}"] = w.contiguous()
    return out


def fused_shape(layout: ExpertLayout, param: str) -> tuple[int, ...]:
    """The shape of fused parameter ``param`` (``gate_up_proj``, ``down_proj``, their ``_bias``)."""
    e, h, i = layout.num_experts, layout.hidden, layout.intermediate
    rows, cols = (2 * i, h) if param.startswith("gate_up_proj") else (h, i)  # [out, in] of each expert
    if param.endswith("_bias"):
        return (e, rows)
    return (e, cols, rows) if layout.is_transposed else (e, rows, cols)
