"""A bounded uniform sample of calibration tokens, so captured inputs never outgrow memory."""

from __future__ import annotations

import torch

from ..distributed import World
from ..seeding import generator, randperm


class RowSample:
    """Keeps each row (token) of the batches it is given with probability ``rate``; when more
    than ``cap`` rows are held, a random half is dropped and ``rate`` halves, so what is
    held is always a uniform sample of everything seen. Row counts are host integers taken
    from shapes: no device sync. Draws come from ``generator`` (on the data's device), so the
    sample is the same on every run with the same seed. ``empty`` is what a rank none of
    whose tokens reached the input offers the pool (no rows of the input's width and dtype)."""

    def __init__(self, cap: int, generator: torch.Generator, empty: torch.Tensor | None = None) -> None:
        self.cap = cap
        self.generator = generator
        self.empty = empty
        self.rate = 1.0
        self.count = 0
        self.seen = 0
        self._rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.seen += n
        k = round(n * self.rate)
        if k < n:
            x = x[randperm(n, self.generator)[:k].to(x.device)]
        else:
            x = x.detach().clone()  # the caller may reuse its activation buffer
        self._rows.append(x)
        self.count += x.shape[0]
        while self.count > self.cap:
            allx = torch.cat(self._rows)
            keep = allx[randperm(allx.shape[0], self.generator)[: allx.shape[0] // 2].to(allx.device)]
            self._rows, self.count, self.rate = [keep], keep.shape[0], self.rate / 2

    def reduce(self, world: World) -> None:
        """Every rank's sample pooled, thinned to ``cap`` rows: still uniform over all tokens
        when the ranks saw similar numbers of tokens (round-robin batches)."""
        if world.size > 1:
            mine = self.rows() if self._rows or self.empty is None else self.empty.to(world.device)
            self._rows = [pooled_sample(world, mine, self.cap, self.generator.initial_seed())]
            self.count = self._rows[0].shape[0]

    def rows(self) -> torch.Tensor:
        return torch.cat(self._rows)


def pooled_sample(world: World, rows: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """The rows of every rank (rank order), at most ``cap`` of them kept at random. The draw
    comes from ``seed`` (the sample's own, from the recipe seed and the layer and group) and
    the pooled count, the same on every rank, so every rank keeps the same rows."""
    pooled = world.gather_rows(rows)
    if pooled.shape[0] <= cap:
        return pooled
    keep = randperm(pooled.shape[0], generator(seed, "pooled", pooled.shape[0], device=pooled.device))
    return pooled[keep[:cap].sort().values]
