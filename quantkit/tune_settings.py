"""``quantkit tune``'s schedule, apart from the tuning so that the CLI's help and the recipe's
``tune`` section read the same defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QuantkitError


@dataclass(frozen=True)
class TuneSettings:
    """Adam's schedule: ``steps`` minibatches of ``batch_size`` windows at a cosine-decayed ``lr``
    (measured on SmolLM2, ten draws: 32 steps of 8 windows of 256 tokens at 1e-3 keep 0.09 of
    AutoRound's perplexity increase at a quarter of 128 steps' time, which keep none; 3e-3 fits
    the calibration's domain better and held-out domains worse, 1e-2 diverges; docs/quality.md,
    stop 42)."""

    steps: int = 32
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for value, flag in ((self.steps, "--steps"), (self.batch_size, "--batch-size"), (self.lr, "--lr")):
            if not value > 0:
                raise QuantkitError(f"{flag} must be positive, got {value}", field=flag, value=value)
