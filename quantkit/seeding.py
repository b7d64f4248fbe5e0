"""Random draws of a run, each from its own ``torch.Generator``.

A generator is seeded from the recipe's ``calibration.seed`` and the place of the draw (layer
index, input group, batch): the same recipe gives the same checkpoint, whatever ran before in
the process, in whichever order layers or groups are processed, and a resumed run draws what
the uninterrupted one drew. The global RNG, which user code and libraries share, is never used.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *where: object) -> int:
    """A 63-bit seed for the draw at ``where`` (e.g. ``(3, "mlp.down_proj")``) under ``seed``."""
    digest = hashlib.sha256(repr((seed, *where)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, *where: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for the draw at ``where``. Draw on the data's device: the same
    seed gives the same numbers on every run there (CPU and CUDA draws differ from each other)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *where))


def randperm(n: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(n)`` drawn from ``gen``, on its device."""
    return torch.randperm(n, generator=gen, device=gen.device)


def randint(high: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` integers in ``[0, high)`` drawn from ``gen``, on its device."""
    return torch.randint(high, (count,), generator=gen, device=gen.device)
