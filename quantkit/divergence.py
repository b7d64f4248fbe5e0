"""How far the quantized model's next-token distributions are from the base model's.

Perplexity moves little when a quantized model is wrong in both directions at once; the
KL divergence of its next-token distribution from the base model's, and how often the two
agree on the most likely token, show the change per token. Both come from the same logits
as perplexity, in chunks of positions: the ``[tokens, vocab]`` logits of a 128k vocabulary
never sit whole in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

CHUNK_BYTES = 256 * 2**20
"""Budget for one chunk of logits (two streams, float32): 256 MiB is 256 positions of a 128k vocabulary."""


def token_kl(base_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_quant) per row, in nats, computed in float32 from ``[n, vocab]`` logits."""
    base = F.log_softmax(base_logits.float(), dim=-1)
    quant = F.log_softmax(quant_logits.float(), dim=-1)
    return F.kl_div(quant, base, log_target=True, reduction="none").sum(-1).clamp_min(0.0)


def top1_agreement(base_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """Per row: does the quantized model's most likely token equal the base model's?"""
    return base_logits.argmax(-1) == quant_logits.argmax(-1)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default), for any length
    (``torch.quantile`` refuses more than 2**24 values)."""
    v = values.flatten().double().sort().values
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


@dataclass
class StreamComparison:
    """Running sums over positions of the base and quantized streams: the negative
    log-likelihoods both perplexities come from, the per-position KL, the top-1 matches."""

    nll_base: float = 0.0
    nll_quant: float = 0.0
    agree: int = 0
    count: int = 0
    kl: list[torch.Tensor] = field(default_factory=list)

    def add(self, base_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One chunk: ``[n, vocab]`` logits of both streams and the ``[n]`` next tokens."""
        targets = targets.to(base_logits.device)
        self.nll_base += F.cross_entropy(base_logits.float(), targets, reduction="sum").item()
        self.nll_quant += F.cross_entropy(quant_logits.float(), targets, reduction="sum").item()
        self.kl.append(token_kl(base_logits, quant_logits).cpu())
        self.agree += int(top1_agreement(base_logits, quant_logits).sum())
        self.count += len(targets)

    @property
    def perplexity_base(self) -> float:
        return math.exp(self.nll_base / self.count)

    @property
    def perplexity_quantized(self) -> float:
        return math.exp(self.nll_quant / self.count)

    def divergence(self) -> dict[str, float | int]:
        """What report.json carries: KL mean and p99 (nats), top-1 agreement, positions."""
        kl = torch.cat(self.kl)
        return {"kl_mean": float(kl.double().mean()), "kl_p99": quantile(kl, 0.99),
                "top1_agreement": self.agree / self.count, "positions": self.count}


def compare_streams(streams: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], vocab_size: int,
                    chunk_bytes: int = CHUNK_BYTES) -> StreamComparison:
    """Run ``head`` (hidden states and their token ids -> logits) over both streams in chunks.

    ``streams`` yields ``(h_base, h_quant, ids, targets)``: hidden states ``[n, len, d]`` at
    the positions that predict ``targets`` ``[n, len]``, and ``ids`` ``[n, len]``, those
    positions' own tokens, which the model's forward (the head) takes beside them. The head
    works position by position, so a chunk is any block of sequences × positions; one holds
    at most ``chunk_bytes`` of float32 logits for the two streams together.
    """
    budget = max(1, chunk_bytes // (2 * 4 * vocab_size))
    result = StreamComparison()
    with torch.no_grad():
        for h_base, h_quant, ids, targets in streams:
            n, length = targets.shape
            cols = min(length, budget)
            seqs = max(1, budget // cols)
            for a in range(0, n, seqs):
                for c in range(0, length, cols):
                    block = (slice(a, a + seqs), slice(c, c + cols))
                    result.add(head(h_base[block], ids[block]).flatten(0, 1),
                               head(h_quant[block], ids[block]).flatten(0, 1), targets[block].reshape(-1))
    return result
