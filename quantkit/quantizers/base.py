"""The quantizer plugin protocol and its registry.

A quantizer turns one float decoder layer (on the device) plus a way to stream that layer's
calibration inputs through it into a ``QuantizedWeight`` per Linear. It may also rewrite the
layer's float parameters (AWQ and SmoothQuant fold scales into norms), which the engine then
exports as they are. It never sees a file format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Collection, Literal, Mapping, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..distributed import World
from ..graph.types import LayerGraph
from ..scheme import ActivationScheme, QuantizedWeight, Scheme, quantized_as_tensors, quantized_from_tensors
from ..targets import ANY_LINEAR, SchemeAssignment, check_patterns

InputHook = Callable[[torch.Tensor], None]

# Hook names for what the layer's attention receives, besides Linear names: the key and
# value tensors ``[batch, kv_heads, tokens, head_dim]`` after the model's own k_norm and RoPE,
# which is what a KV cache stores and what its scales must cover.
ATTENTION_KEY = "@attention.key"
ATTENTION_VALUE = "@attention.value"


class Statistic(Protocol):
    """What a quantizer observes about one input: fed every calibration batch of this rank,
    then reduced once over the ranks (sums with counts, maxima, samples), after which every
    rank holds the statistic of all the calibration data."""

    def add(self, x: torch.Tensor) -> None:
        ...

    def reduce(self, world: World) -> None:
        ...


class PairedStatistic(Protocol):
    """A statistic of a Linear's input on the quantized model's stream and, for the same
    tokens, on the float model's stream (both ``[tokens, in_features]``); reduced as
    ``Statistic`` is."""

    def add(self, quantized: torch.Tensor, float_: torch.Tensor) -> None:
        ...

    def reduce(self, world: World) -> None:
        ...


class LayerCalibration(Protocol):
    """Streams the current layer's calibration inputs through the float layer; ``world`` is
    the ranks sharing them (``world.solve`` runs work on owner ranks and shares the result)."""

    world: World

    def observe(self, stats: Mapping[str, Statistic], later: Collection[str] = ()) -> None:
        """Run this rank's calibration batches through the layer, then reduce every statistic.

        ``stats`` maps a Linear's name inside the layer (``"mlp.down_proj"``) to the statistic
        fed with that Linear's input, flattened to ``[tokens, in_features]``;
        ``ATTENTION_KEY`` / ``ATTENTION_VALUE`` to one fed with the attention's key/value.
        ``later``: the names later passes over this layer will feed (a sequential quantizer's
        later stages). Once no pass is left that reads the attention block, and that block is
        quantized and substituted, the quantized stream runs it no more: later passes and the
        propagation start from the residual it left.
        """
        ...

    def observe_paired(self, stats: Mapping[str, PairedStatistic], later: Collection[str] = ()) -> None:
        """Run this rank's calibration batches through the layer twice: as the quantized model
        so far gives them, and as the float model gives them (each rank carries the float
        stream of its own batches); each statistic gets both inputs of its Linear for the
        same tokens, then every statistic is reduced, but for those of an expert's Linear that
        carry its owner as ``owner``, which are fed on the owner alone with every rank's token
        pairs, as ``observe`` feeds them. Only for quantizers with ``needs_float_inputs``.

        ``later`` as for ``observe``; the float stream stops running the attention block as
        soon as no later pass reads it. Without ``later`` this is the layer's last pass over
        the float stream, which then leaves the layer in the same pass instead of in one more
        forward after quantization."""
        ...

    def substitute(self, weights: Mapping[str, QuantizedWeight]) -> None:
        """From now on run the quantized stream with these Linears' weights (by name inside
        the layer), dequantized, in place of the layer's own: a sequential quantizer's later
        groups see the earlier ones quantized. The float stream and the layer keep theirs."""
        ...

    def generator(self, name: str) -> torch.Generator:
        """The generator for random draws about ``name`` (a Linear or group) in this layer,
        seeded from the recipe's seed and the layer index: never draw from the global RNG."""
        ...

    def expert_owner(self, name: str) -> int | None:
        """The rank that owns the MoE expert Linear ``name`` belongs to, decided before any
        statistic (None outside experts). ``observe`` feeds a statistic that carries that
        rank as its ``owner`` on the owner alone, with every rank's tokens, and never reduces
        it: a quantizer that solves an expert on its owner keeps each expert's statistics on
        one rank."""
        ...


class Joined:
    """Several statistics of one input (GPTQ's Hessian and a static activation range), or
    several paired statistics of one pair of inputs (the engine takes either apart to feed
    each part where it lives)."""

    def __init__(self, *stats: Statistic | PairedStatistic) -> None:
        self.stats = stats

    def add(self, *inputs: torch.Tensor) -> None:
        for s in self.stats:
            s.add(*inputs)

    def reduce(self, world: World) -> None:
        for s in self.stats:
            s.reduce(world)


UnitJob = tuple[float, Callable[[], dict[str, QuantizedWeight]]]


def solve_units(world: World, jobs: Mapping[str, UnitJob],
                pinned: Mapping[str, int] | None = None) -> dict[str, QuantizedWeight]:
    """Run every job ``key -> (estimated cost, solve)`` on its owner rank (``pinned`` ones on
    theirs) and give every rank all the Linears they quantized. A job is a unit of work (a
    Linear, Linears stacked on one Hessian, an expert), so the assignment balances whatever
    the model's units are."""

    def packed(fn: Callable[[], dict[str, QuantizedWeight]]) -> Callable[[], tuple[dict, dict]]:
        return lambda: quantized_as_tensors(fn())

    out: dict[str, QuantizedWeight] = {}
    for tensors, schemes in world.solve({k: (c, packed(fn)) for k, (c, fn) in jobs.items()}, pinned).values():
        out.update(quantized_from_tensors(tensors, schemes))
    return out


class QuantizerParams(BaseModel):
    """Recipe parameters of one method; subclasses fix ``method`` to a Literal."""

    model_config = ConfigDict(extra="forbid")

    method: str
    rotate: Literal["none", "hadamard"] = Field(
        "none", description="hadamard: rotate the residual stream (and each value head) by randomized Hadamards "
        "fused into the weights before quantizing; same function, fewer outliers; vLLM serves it as is")
    online_down_proj: bool = Field(
        False, description="a Hadamard on down_proj's input that vLLM applies at run time (compressed-tensors "
        "transform_config; weight side fused before quantizing); one more small matmul per MLP when serving")
    targets: list[str] = Field(
        [ANY_LINEAR], description="Linears to quantize: 'Linear' (all), full module names, or 're:<regex>'")
    ignore: list[str] = Field(
        [], description="Linears left in float, as targets (e.g. 're:.*\\.0\\.mlp\\.down_proj$')")

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return check_patterns(v)

    @model_validator(mode="after")
    def _online_hadamard_needs_unscaled_inputs(self) -> "QuantizerParams":
        if self.online_down_proj and self.folds_input_scales():
            raise ValueError("online_down_proj: this method folds per-channel scales into down_proj's input, which "
                             "does not commute with the Hadamard vLLM applies there")
        return self

    def folds_input_scales(self) -> bool:
        """Whether the method scales Linears' input channels, folding the inverse upstream (AWQ, SmoothQuant)."""
        return False

    def scheme(self) -> Scheme:
        """The scheme of every targeted Linear no override names."""
        raise NotImplementedError

    def assignment(self) -> SchemeAssignment:
        """Which Linears are quantized, and how."""
        return SchemeAssignment(self.scheme(), tuple(self.targets), tuple(self.ignore))

    def kv_cache_scheme(self) -> ActivationScheme | None:
        """The KV-cache quantization this method calibrates, if any."""
        return None


class Quantizer(ABC):
    """Base of every quantizer; subclasses set ``Params`` and register with a name."""

    Params: ClassVar[type[QuantizerParams]]
    # Read from the instance: a method may need data only for some parameters (fp8 static
    # activations, int8 with GPTQ weights) and sets it in __init__.
    needs_calibration: bool = True
    # The engine then keeps the float model's calibration stream beside the quantized one
    # (twice the calibration activations) for ``LayerCalibration.observe_paired``.
    needs_float_inputs: bool = False
    # The float32 ``[in, in]`` statistics kept per input group while a layer calibrates, named
    # by what each is: ``moe.statistics_chunks`` budgets them and ``quantkit plan`` counts them.
    # GPTQ's one Hessian also bounds the smaller statistics of the other methods.
    statistics: tuple[str, ...] = ("Hessian",)
    # Float64 ``[in, in]`` matrices that computing a Linear's target (what its solve then
    # approximates) holds at its peak, before the solve: ``quantkit plan`` counts them for the
    # widest input, against the solve's own working set. Zero: the target is the weight.
    target_matrices: int = 0
    default_format: ClassVar[str] = "compressed-tensors"

    def __init__(self, params: QuantizerParams, model_config: dict) -> None:
        self.params = params
        self.model_config = model_config
        self.scheme = params.scheme()
        self.assignment = params.assignment()

    def layer_schemes(self, prefix: str, graph: LayerGraph) -> dict[str, Scheme]:
        """The units of the decoder layer at ``prefix`` (``model.layers.3.``) to quantize, by
        their names inside the layer, and their schemes."""
        resolved = self.assignment.resolve(prefix + n for n in graph.linears)
        return {n[len(prefix):]: s for n, s in resolved.items()}

    @abstractmethod
    def quantize_layer(
        self, layer: nn.Module, graph: LayerGraph, calib: LayerCalibration,
        schemes: Mapping[str, Scheme] | None = None,
    ) -> dict[str, QuantizedWeight]:
        """Quantize the units of ``schemes`` (names inside the layer) with their schemes, or,
        without it, every unit of ``graph`` (``graph.linears``) with ``self.scheme``; keys are
        those names. Units left out stay float (their weights may still be rescaled by folding).

        ``graph`` says which units share an input (``graph.groups``), what produces it and
        whether a scale folds into it exactly (``group.foldable``, ``graph.fold.fold_scales``)."""

    def schemes_or_default(self, graph: LayerGraph, schemes: Mapping[str, Scheme] | None) -> dict[str, Scheme]:
        return dict(schemes) if schemes is not None else {n: self.scheme for n in graph.linears}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Float tensors to export beside the last layer quantized (e.g. KV-cache scales),
        named relative to the layer (``"self_attn.k_scale"``)."""
        return {}


QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[name] = cls
        return cls

    return wrap
