"""The layer graph's data model: what quantizers, folds and rotations may rely on.

A ``LayerGraph`` describes one decoder-layer type, derived from the model's own code (see
``derive.py``); every "exact" or "rotatable" claim in it was confirmed numerically on a
random float64 instance of that layer before the graph was handed out. Names are relative
to the decoder layer (``"self_attn.q_proj"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import torch

Role = Literal["q", "k", "v", "o", "gate", "up", "down", "other"]
ProducerKind = Literal[
    "norm",             # a norm's output is x̂ * w (+ b): fold 1/s into w (and b)
    "offset_norm",      # x̂ * (1 + w), as Gemma: fold by w ← (1 + w)/s − 1
    "linear_rows",      # a Linear's output rows (or a row slice of a fused one) read as they are
    "glu_partner",      # the "up" rows of act(gate) * up: scaling them scales the product
    "attention_value",  # v rows: each attention output channel is a mix of one v channel
    "unfoldable",       # the input is produced by something a scale cannot be folded into
]


@dataclass(frozen=True)
class ChannelMap:
    """Which producer channel feeds each consumer input channel ``j``:
    ``start + (j // (head_dim * group)) * head_dim + j % head_dim``.

    ``group`` 1 is one-to-one (offset by ``start``, the first row of a slice of a fused
    projection). ``group`` > 1 is attention under GQA: ``group`` query heads share one kv
    head, so consumer channels of those heads read the same v channel and a fold's scale
    must be equal across them (the tie a scale search has to respect).
    """

    start: int = 0
    group: int = 1
    head_dim: int = 1

    @property
    def tied(self) -> bool:
        return self.group > 1

    def producer_channels(self, consumer_channels: int) -> int:
        return consumer_channels // self.group

    def index(self, consumer_channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Producer channel of each consumer channel, relative to ``start``, int64 ``[n]``."""
        j = torch.arange(consumer_channels, device=device)
        d = self.head_dim
        return (j // (d * self.group)) * d + j % d


@dataclass(frozen=True)
class Producer:
    """The op whose output a group of Linears reads, and whether a fold into it is exact."""

    module: str | None  # None: the layer's input (the residual stream) or an unnamed op
    kind: ProducerKind
    channels: ChannelMap = ChannelMap()
    rows: tuple[int, int] | None = None  # the producer's output rows read, when a slice
    exact: bool = False
    reason: str | None = None  # why a fold is not exact, when it is not


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, end)`` of a unit's output with one role (a fused unit has several)."""

    role: Role
    start: int
    end: int


@dataclass(frozen=True)
class Unit:
    """A quantizable matrix: a 2-D weight, or a slice of a parameter.

    Dense layers have one unit per ``nn.Linear`` (``param`` = ``name + ".weight"``). A
    Mixture-of-Experts layer keeps its experts as 3-D parameters (``mlp.experts.gate_up_proj``
    ``[E, 2I, H]``); each expert is then a unit with ``expert`` set, addressed as
    ``param[expert]`` (and ``rows`` for a row range), so quantizers see a matrix either way.
    """

    name: str
    param: str
    in_features: int
    out_features: int
    segments: tuple[Segment, ...] = ()
    expert: int | None = None
    rows: tuple[int, int] | None = None
    bias: bool = False

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(s.role for s in self.segments)

    @property
    def fused(self) -> bool:
        return len(self.segments) > 1

    def matrix(self, layer: torch.nn.Module) -> torch.Tensor:
        """The unit's ``[out, in]`` weight inside ``layer`` (a view, never a copy)."""
        w = layer.get_parameter(self.param)
        if self.expert is not None:
            w = w[self.expert]
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        return w


@dataclass(frozen=True)
class InputGroup:
    """Units that read one tensor: their statistics (Hessian, activation ranges) are
    gathered once, and a fold scales all of their input columns together.

    ``fused`` lists the sets vLLM fuses into one kernel (units of the group under the same
    parent module: q/k/v, gate/up); Cohere's q, k, v, gate and up read one norm but form
    two fused sets.
    """

    linears: tuple[str, ...]
    producer: Producer
    fused: tuple[tuple[str, ...], ...] = ()

    @property
    def key(self) -> str:
        """The Linear whose input hook sees the group's input."""
        return self.linears[0]

    @property
    def foldable(self) -> bool:
        """A per-channel scale folds exactly, one free value per input channel (no tie)."""
        return self.producer.exact and not self.producer.channels.tied


@dataclass(frozen=True)
class ResidualReader:
    """A module reading the residual stream, and whether an orthogonal rotation of the
    stream can be absorbed into it (its norm weight first folded into ``consumers``)."""

    module: str
    kind: Literal["norm", "offset_norm", "linear", "other"]
    consumers: tuple[str, ...] = ()
    rotatable: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class ResidualWriter:
    """What adds into the residual stream: a Linear's rows (rotatable) or, with post-norms
    (Gemma 2/3, OLMo 2), a norm whose weight sits between the Linear and the stream."""

    module: str
    kind: Literal["linear_rows", "post_norm", "other"]
    rotatable: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class Resume:
    """Where a pass may pick the layer up after its attention block: ``reader`` reads the
    residual stream once that block has added into it, and the layer computes its output
    from that residual alone once the ``skipped`` modules (every one called before
    ``reader``) return zeros shaped as their input; ``returns`` lays out each one's output:
    None a bare tensor, else each element a tensor (True) or None. ``before`` are the
    Linears called before ``reader``: a pass that starts there feeds none of them."""

    reader: str
    skipped: tuple[str, ...]
    returns: tuple[tuple[bool, ...] | None, ...]
    before: tuple[str, ...]


@dataclass(frozen=True)
class Unquantized:
    """A module of the layer that stays in float, and why."""

    module: str
    reason: str


@dataclass(frozen=True)
class LayerGraph:
    """One decoder-layer type. ``units`` are the quantizable matrices in execution order."""

    layer_class: str
    units: tuple[Unit, ...]
    groups: tuple[InputGroup, ...]
    readers: tuple[ResidualReader, ...] = ()
    writers: tuple[ResidualWriter, ...] = ()
    unquantized: tuple[Unquantized, ...] = ()
    unsupported: str | None = None  # why the engine cannot process this layer type
    output_index: int | None = None  # the layer returns a tuple; the hidden state is at this index
    experts: tuple[str, ...] = field(default=())  # Mixture-of-Experts blocks' experts modules ("mlp.experts")
    resume: Resume | None = None  # None: every pass runs the layer from its input

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units)

    def unit(self, name: str) -> Unit:
        try:
            return self._units_by_name[name]
        except KeyError:
            raise KeyError(name) from None

    @cached_property
    def _units_by_name(self) -> dict[str, Unit]:
        """Units by name (the first of a name): a 128-expert layer has 386 units, and checks
        that ask for each of them by name scanned the list for each."""
        index: dict[str, Unit] = {}
        for u in self.units:
            index.setdefault(u.name, u)
        return index

    def per_expert(self) -> LayerGraph:
        """The graph for calibration where each expert sees only its routed tokens: a group
        whose Linears span several experts (all of them reading one tensor when every token
        goes through every expert) splits into one group per expert, plus one for the rest
        (a shared expert)."""
        from .experts import expert_of

        groups: list[InputGroup] = []
        for g in self.groups:
            parts: dict[object, list[str]] = {}
            for n in g.linears:
                hit = expert_of(n)
                parts.setdefault(hit, []).append(n)
            for names in parts.values():
                fused = tuple(f for f in g.fused if set(f) <= set(names))
                groups.append(InputGroup(tuple(names), g.producer, fused))
        return replace(self, groups=tuple(groups))

    @property
    def rotatable(self) -> bool:
        """The residual stream can be rotated exactly through this layer."""
        return bool(self.readers) and all(r.rotatable for r in self.readers) and all(
            w.rotatable for w in self.writers)

    def rotation_blockers(self) -> list[str]:
        return [f"{x.module}: {x.reason}" for x in (*self.readers, *self.writers) if not x.rotatable]
