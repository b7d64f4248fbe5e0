"""The rule that decides whether vLLM serves a checkpoint as quantkit computed it.

Greedy continuations do not decide: bf16 arithmetic flips near-ties (leads of a few hundredths
of a nat), after which two correct models write different text. What decides is teacher
forcing: vLLM scores the reference's own continuation (the fake-quantized model's greedy
tokens), and its most likely token must be the reference's at every position that is not a
near-tie. A position is a near-tie when the reference's lead of its top token over the
runner-up is below ``tie``: twice the largest change that computing the reference itself in
the served dtype makes to a token's log-probability, and at least ``TIE_FLOOR``. A wrong scale,
zero point or packing order breaks confident predictions, not only near-ties.

``benchmarks/vllm_check.py`` produces the inputs (the reference in transformers, vLLM's scores
in vLLM's own environment) and prints the table; the rule lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TIE_FLOOR = 0.1
"""Smallest lead (nats) of the reference's most likely token that vLLM must reproduce."""


@dataclass(frozen=True)
class Verdict:
    """How vLLM's teacher-forced scores compare with the reference's, over every position."""

    prefix_lens: list[int]  # greedy common prefix per prompt: shown, never decisive
    agree: int  # positions where vLLM's most likely token is the reference's
    total: int
    tie: float  # leads below this are near-ties
    hard_flips: int  # disagreements where the reference was confident: any fails the check
    near_tie_flips: int
    dlogprob_mean: float  # |vLLM's log-prob - the reference's| of the reference's tokens
    dlogprob_max: float
    noise_mean: float  # the same, for the reference computed in the served dtype

    @property
    def passed(self) -> bool:
        return self.hard_flips == 0


def judge(reference: dict[str, Any], served: dict[str, Any]) -> Verdict:
    """The verdict on one checkpoint.

    ``reference`` holds, per prompt, the reference's greedy continuation (``reference``) and,
    along it, its log-probabilities computed in float32 (``ref_logprob``) and in the served
    dtype (``ref_low_logprob``), its most likely tokens (``ref_top``) and their leads over the
    runner-up (``ref_margin``). ``served`` holds vLLM's greedy tokens (``tokens``) and, scoring
    the reference's continuation, its most likely tokens (``forced_top``) and the log-probabilities
    of the reference's tokens (``forced_logprob``).
    """
    ref, lp, margin = _flat(reference["ref_top"]), _flat(reference["ref_logprob"]), _flat(reference["ref_margin"])
    low, served_lp, served_top = (_flat(reference["ref_low_logprob"]), _flat(served["forced_logprob"]),
                                  _flat(served["forced_top"]))
    noise = [abs(a - b) for a, b in zip(low, lp)]
    diff = [abs(a - b) for a, b in zip(served_lp, lp)]
    tie = max(TIE_FLOOR, 2 * max(noise))
    flips = [m for r, t, m in zip(ref, served_top, margin) if r != t]
    return Verdict(
        prefix_lens=[common_prefix(r, t) for r, t in zip(reference["reference"], served.get("tokens", []))],
        agree=sum(r == t for r, t in zip(ref, served_top)), total=len(ref), tie=tie,
        hard_flips=sum(m >= tie for m in flips), near_tie_flips=sum(m < tie for m in flips),
        dlogprob_mean=sum(diff) / len(diff), dlogprob_max=max(diff), noise_mean=sum(noise) / len(noise),
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _flat(rows: list[list]) -> list:
    return [x for r in rows for x in r]
