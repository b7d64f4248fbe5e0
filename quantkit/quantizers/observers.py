"""Activation observers: a static per-tensor range from calibration activations.

The statistics are pure functions over a tensor of samples (``minmax_amax``,
``percentile_amax``, ``mse_amax``); ``TensorObserver`` streams calibration batches into
them with bounded memory (exact running max, plus a uniform random subsample of at most
``max_samples`` values for the percentile and MSE statistics, drawn with the observer's own
generator).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..distributed import World
from ..seeding import randint, randperm
from .sampling import pooled_sample

ObserverKind = Literal["minmax", "percentile", "mse"]
_TINY = 1e-12


def minmax_amax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` as a float32 scalar tensor."""
    return x.detach().abs().amax().to(torch.float32)


def percentile_amax(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of ``|x|`` (nearest rank), float32 scalar."""
    a = x.detach().reshape(-1).abs().to(torch.float32)
    k = min(a.numel(), max(1, math.ceil(percentile / 100.0 * a.numel())))
    return a.kthvalue(k).values


def mse_amax(x: torch.Tensor, num_bits: int = 8, grid: int = 100, min_ratio: float = 0.2) -> torch.Tensor:
    """The clipping range in ``[min_ratio, 1] · max|x|`` minimising the symmetric int fake-
    quantisation error ``||x − Q(x)||²`` over ``grid`` evenly spaced candidates."""
    a = x.detach().reshape(-1).to(torch.float32)
    amax = a.abs().amax()
    qmax = 2 ** (num_bits - 1) - 1
    ratios = torch.linspace(1.0, min_ratio, grid, device=a.device)
    losses = []
    for r in ratios:
        scale = (amax * r / qmax).clamp_min(_TINY)
        q = torch.round(a / scale).clamp(-qmax - 1, qmax) * scale
        losses.append((q - a).pow(2).sum())
    return amax * ratios[torch.stack(losses).argmin()]


def int_scale(amax: torch.Tensor, num_bits: int = 8) -> torch.Tensor:
    """Symmetric int activation scale ``amax / qmax`` as the ``[1]`` float32 input_scale."""
    return (amax.to(torch.float32) / (2 ** (num_bits - 1) - 1)).clamp_min(_TINY).reshape(1)


class TensorObserver:
    """Streams ``[tokens, in]`` batches; ``amax()`` gives the chosen statistic. The subsample
    is drawn from ``generator`` (on the data's device), so the statistic is the same on every
    run with the same seed."""

    def __init__(
        self,
        kind: ObserverKind = "minmax",
        percentile: float = 99.99,
        num_bits: int = 8,
        max_samples: int = 1 << 22,
        *,
        generator: torch.Generator,
    ) -> None:
        self.kind = kind
        self.generator = generator
        self.percentile = percentile
        self.num_bits = num_bits
        self.max_samples = max_samples
        self._max: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._count = 0
        self._rate = 1.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        m = minmax_amax(x)
        self._max = m if self._max is None else torch.maximum(self._max, m)
        if self.kind == "minmax":
            return
        flat = x.reshape(-1)
        k = round(flat.numel() * self._rate)
        if k < flat.numel():
            flat = flat[randint(flat.numel(), k, self.generator).to(flat.device)]
        self._samples.append(flat.to(torch.float32))
        self._count += flat.numel()
        while self._count > self.max_samples:
            # Keep a random half and halve the rate: still a uniform sample of everything.
            allv = torch.cat(self._samples)
            keep = allv[randperm(allv.numel(), self.generator)[: allv.numel() // 2].to(allv.device)]
            self._samples, self._count, self._rate = [keep], keep.numel(), self._rate / 2

    def reduce(self, world: World) -> None:
        """The maximum over the ranks; for the sampled statistics the ranks' samples pooled."""
        if world.size == 1:
            return
        if self._max is None:  # none of this rank's tokens reached it: no maximum to offer
            self._max = torch.tensor(float("-inf"), device=world.device)
        world.all_reduce(self._max, "max")
        if self.kind != "minmax":
            mine = self.samples() if self._samples else torch.empty(0, device=world.device)
            self._samples = [pooled_sample(world, mine, self.max_samples, self.generator.initial_seed())]
            self._count = self._samples[0].numel()

    def samples(self) -> torch.Tensor:
        return torch.cat(self._samples)

    def amax(self) -> torch.Tensor:
        if self._max is None or bool(torch.isneginf(self._max)):
            raise ValueError("observer saw no activations")
        if self.kind == "minmax":
            return self._max
        if self.kind == "percentile":
            return percentile_amax(self.samples(), self.percentile)
        return mse_amax(self.samples(), self.num_bits)


class AbsMax:
    """Running ``max |x|``, over everything or per input channel (``per_channel`` of them),
    with no host sync; reduced by MAX over the ranks. ``amax`` stays None when no rank saw a
    token (an expert no calibration token was routed to)."""

    def __init__(self, per_channel: int | None = None) -> None:
        self.per_channel = per_channel
        self.amax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=0).to(torch.float32) if self.per_channel else minmax_amax(x)
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)

    def reduce(self, world: World) -> None:
        if world.size == 1:
            return
        # A rank none of whose tokens reached the input offers -inf, which MAX ignores.
        mine = self.amax if self.amax is not None else torch.full(
            (self.per_channel,) if self.per_channel else (), float("-inf"), device=world.device)
        world.all_reduce(mine, "max")
        self.amax = None if bool(torch.isneginf(mine).any()) else mine
