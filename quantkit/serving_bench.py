"""Serving speed of one model: throughput, time to first token and per-token latency at several
concurrencies, for four kinds of prompt, with the model's answers.

The measuring works on any ``StreamingEngine`` (an async stream of generated-token deltas per
request), so it is tested with a fake engine; ``vllm_worker.py`` gives it vLLM's ``AsyncLLM``.
Standard library only: it runs inside vLLM's Python environment, which may not be quantkit's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

PROMPTS: dict[str, list[str]] = {
    "short_qa": [
        "What is the capital of Japan? Answer in one sentence.",
        "How many minutes are in three hours?",
        "Who wrote the play Romeo and Juliet?",
        "What gas do plants take in from the air?",
    ],
    "code": [
        "Write a Python function that returns the n-th Fibonacci number iteratively.",
        "Write a Python function that checks whether a string is a palindrome, ignoring case.",
        "Write a SQL query that counts the orders per customer in a table orders(customer_id, id).",
        "Write a JavaScript function that removes duplicate values from an array.",
    ],
    "chinese": [
        "请用三句话介绍一下长城。",
        "请把这句话翻译成英文：今天天气很好，我们去公园散步吧。",
        "为什么秋天树叶会变黄？请简单解释。",
        "请写一首关于月亮的四行短诗。",
    ],
    "reasoning": [
        "A shop sells pens at 3 dollars each. Tom buys 4 pens and pays with a 20 dollar note. "
        "How much change does he get? Think step by step.",
        "If a train leaves at 9:40 and the journey takes 2 hours and 35 minutes, when does it arrive? "
        "Explain each step.",
        "Anna is older than Ben. Ben is older than Chris. Who is the youngest? Reason step by step.",
        "A rectangle is 7 cm long and 4 cm wide. What are its area and its perimeter? Show your working.",
    ],
}
"""Written by the quantkit project: the four kinds of request the deployment guides check by hand."""


class StreamingEngine(Protocol):
    def stream(self, prompt: str, max_tokens: int, request_id: str,
               fixed_length: bool) -> AsyncIterator[tuple[int, str]]:
        """Yield ``(new tokens, new text)`` as the engine produces them. ``fixed_length``: exactly
        ``max_tokens`` tokens, end-of-sequence ignored (equal work for every model measured)."""


@dataclass
class RequestTiming:
    kind: str
    submitted: float
    first_token: float | None
    finished: float
    tokens: int
    text: str

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def per_token(self) -> float | None:
        """Mean seconds per output token after the first (decode latency)."""
        if self.first_token is None or self.tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.tokens - 1)


async def _one(engine: StreamingEngine, kind: str, prompt: str, max_tokens: int, request_id: str,
               fixed_length: bool, clock: Callable[[], float]) -> RequestTiming:
    submitted, first, tokens, text = clock(), None, 0, []
    async for n, delta in engine.stream(prompt, max_tokens, request_id, fixed_length):
        if n and first is None:
            first = clock()
        tokens += n
        text.append(delta)
    return RequestTiming(kind, submitted, first, clock(), tokens, "".join(text))


async def run_level(engine: StreamingEngine, kind: str, prompts: list[str], concurrency: int, max_tokens: int,
                    fixed_length: bool = True, clock: Callable[[], float] = time.perf_counter,
                    tag: str = "") -> tuple[list[RequestTiming], float]:
    """Send ``max(len(prompts), 2 * concurrency)`` requests (prompts cycled), at most
    ``concurrency`` in flight; returns their timings and the wall time of the whole level."""
    limit = asyncio.Semaphore(concurrency)
    n = max(len(prompts), 2 * concurrency)

    async def guarded(i: int) -> RequestTiming:
        async with limit:
            return await _one(engine, kind, prompts[i % len(prompts)], max_tokens, f"{tag}{kind}-{concurrency}-{i}",
                              fixed_length, clock)

    started = clock()
    timings = await asyncio.gather(*(guarded(i) for i in range(n)))
    return list(timings), clock() - started


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(timings: list[RequestTiming], wall: float) -> dict[str, float | int | None]:
    """Throughput over the level's wall time; TTFT and per-token latency over its requests."""
    ttft = [t.ttft for t in timings if t.ttft is not None]
    per_token = [t.per_token for t in timings if t.per_token is not None]
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings), "output_tokens": tokens, "wall_seconds": wall,
        "output_tokens_per_second": tokens / wall if wall > 0 else None,
        "requests_per_second": len(timings) / wall if wall > 0 else None,
        "ttft_mean": sum(ttft) / len(ttft) if ttft else None,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9),
        "per_token_mean": sum(per_token) / len(per_token) if per_token else None,
        "per_token_p50": percentile(per_token, 0.5), "per_token_p90": percentile(per_token, 0.9),
    }


async def measure(engine: StreamingEngine, concurrencies: list[int], max_tokens: int,
                  prompts: dict[str, list[str]] | None = None,
                  on_step: Callable[[str], None] = lambda _: None,
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    """The whole measurement of one model.

    First the answers: every prompt once, all in flight, stopping at end-of-sequence (this also
    warms the engine up). Then, per prompt kind and concurrency, a timed level with exactly
    ``max_tokens`` tokens per request, so every model measured does the same work.
    """
    prompts = prompts or PROMPTS
    answers: dict[str, list[dict[str, str]]] = {}
    for kind, texts in prompts.items():
        timings, _ = await run_level(engine, kind, texts, len(texts), max_tokens, fixed_length=False, clock=clock,
                                     tag="answer-")
        answers[kind] = [{"prompt": p, "answer": t.text} for p, t in zip(texts, timings)]
    on_step("answers")
    levels = []
    for kind, texts in prompts.items():
        for c in concurrencies:
            timings, wall = await run_level(engine, kind, texts, c, max_tokens, clock=clock)
            levels.append({"kind": kind, "concurrency": c, **summarize(timings, wall)})
            on_step(f"{kind} x{c}")
    return {"answers": answers, "levels": levels, "max_tokens": max_tokens, "concurrencies": concurrencies}


def steps(prompts: dict[str, list[str]] | None, concurrencies: list[int]) -> int:
    """How many times ``measure`` calls ``on_step`` (for a progress bar's total)."""
    return 1 + len(prompts or PROMPTS) * len(concurrencies)


__all__ = ["PROMPTS", "StreamingEngine", "RequestTiming", "run_level", "summarize", "measure", "percentile",
           "steps"]
