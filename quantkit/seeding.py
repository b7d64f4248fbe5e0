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


def generator(seed: int, *where: object) -> torch.Generator:
    """A CPU generator for the draw at ``where``; indices drawn with it move to the data's device."""
    return torch.Generator().manual_seed(derive_seed(seed, *where))
