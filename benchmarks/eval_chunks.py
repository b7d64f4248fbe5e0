"""The engine's evaluation head on CUDA: one call over a batch's whole logits against
``compare_streams``' chunks of at most 256 MiB of float32 logits.

    python benchmarks/eval_chunks.py       # on the GPU; prints one table

The engine scores base and quantized logits a chunk of positions at a time so that a batch's
``[seqs, len, vocab]`` logits never sit whole in memory. Chunks mean more, smaller head calls;
this measures what that costs in time against what it saves in memory, at real vocabularies
and widths (random hidden states: the head's cost does not depend on their values).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.divergence import StreamComparison, compare_streams  # noqa: E402

SHAPES = {"Llama-3.1-8B": (4096, 128256), "Qwen2.5-32B": (5120, 152064), "Gemma-3-27B": (5376, 262144)}
SEQS, LEN = 8, 2048


def make_head(hidden: int, vocab: int, g: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A final RMSNorm and a bf16 lm_head, as the engine's skeleton applies them."""
    norm = torch.rand(hidden, generator=g, device="cuda").bfloat16() + 0.5
    lm_head = (torch.randn(vocab, hidden, generator=g, device="cuda") / hidden**0.5).bfloat16()

    def head(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm
        return x @ lm_head.T
    return head


def whole(head: Callable, stream: tuple[torch.Tensor, ...]) -> StreamComparison:
    """The evaluation before the chunks: each stream's logits for the whole batch at once."""
    h_base, h_quant, ids, targets = stream
    result = StreamComparison()
    with torch.no_grad():
        result.add(head(h_base, ids).flatten(0, 1), head(h_quant, ids).flatten(0, 1), targets.reshape(-1))
    return result


def timed(fn: Callable[[], StreamComparison]) -> tuple[float, float, StreamComparison]:
    """Best of three seconds, the peak of CUDA memory above the inputs (GiB), and the result."""
    best, peak, result = float("inf"), 0.0, StreamComparison()
    for _ in range(3):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**30)
    return best, peak, result


def main() -> None:
    print("| model shape (hidden, vocab) | positions | whole batch s | chunks s | time ratio | "
          "whole batch peak GiB | chunks peak GiB | perplexity difference (relative) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (hidden, vocab) in SHAPES.items():
        head = make_head(hidden, vocab, g)
        h_base = torch.randn(SEQS, LEN, hidden, generator=g, device="cuda").bfloat16()
        h_quant = (h_base.float() + 0.05 * torch.randn(SEQS, LEN, hidden, generator=g, device="cuda")).bfloat16()
        ids = torch.randint(vocab, (SEQS, LEN), generator=g, device="cuda")
        targets = torch.randint(vocab, (SEQS, LEN), generator=g, device="cuda")
        stream = (h_base, h_quant, ids, targets)
        t0, m0, r0 = timed(lambda: whole(head, stream))
        t1, m1, r1 = timed(lambda: compare_streams([stream], head, vocab))
        diff = max(abs(a / b - 1) for a, b in ((r1.perplexity_base, r0.perplexity_base),
                                               (r1.perplexity_quantized, r0.perplexity_quantized)))
        print(f"| {name} ({hidden}, {vocab}) | {SEQS * LEN} | {t0:.3f} | {t1:.3f} | {t1 / t0:.2f}x | "
              f"{m0:.1f} | {m1:.2f} | {diff:.1e} |", flush=True)
        del head, h_base, h_quant, ids, targets, stream, r0, r1
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
