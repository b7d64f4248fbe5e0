"""A bounded uniform sample of calibration tokens, so captured inputs never outgrow memory."""

from __future__ import annotations

import torch

from ..distributed import World


class RowSample:
    """Keeps each row (token) of the batches it is given with probability ``rate``; when more
    than ``cap`` rows are held, a random half is dropped and ``rate`` halves, so what is
    held is always a uniform sample of everything seen. Row counts are host integers taken
    from shapes: no device sync."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.rate = 1.0
        self.count = 0
        self.seen = 0
        self._rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.seen += n
        k = round(n * self.rate)
        if k < n:
            x = x[torch.randperm(n, device=x.device)[:k]]
        else:
            x = x.detach().clone()  # the caller may reuse its activation buffer
        self._rows.append(x)
        self.count += x.shape[0]
        while self.count > self.cap:
            allx = torch.cat(self._rows)
            keep = allx[torch.randperm(allx.shape[0], device=allx.device)[: allx.shape[0] // 2]]
            self._rows, self.count, self.rate = [keep], keep.shape[0], self.rate / 2

    def reduce(self, world: World) -> None:
        """Every rank's sample pooled, thinned to ``cap`` rows: still uniform over all tokens
        when the ranks saw similar numbers of tokens (round-robin batches)."""
        if world.size > 1:
            self._rows = [pooled_sample(world, self.rows(), self.cap)]
            self.count = self._rows[0].shape[0]

    def rows(self) -> torch.Tensor:
        return torch.cat(self._rows)


def pooled_sample(world: World, rows: torch.Tensor, cap: int) -> torch.Tensor:
    """The rows of every rank (rank order), at most ``cap`` of them kept at random. The draw is
    seeded by the pooled count, so every rank keeps the same rows."""
    pooled = world.gather_rows(rows)
    if pooled.shape[0] <= cap:
        return pooled
    gen = torch.Generator(device=pooled.device).manual_seed(pooled.shape[0])
    keep = torch.randperm(pooled.shape[0], generator=gen, device=pooled.device)[:cap].sort().values
    return pooled[keep]
