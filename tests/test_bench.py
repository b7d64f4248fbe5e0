"""`quantkit bench`: the measuring logic on a fake continuous-batching engine with a simulated
clock (exact expected numbers, no vLLM, no real time), the report and plots, and the one
line users see when vLLM is missing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from quantkit import serving_bench
from quantkit.bench import BenchModel, BenchSettings, benchmark, vllm_python
from quantkit.cli import main
from quantkit.errors import MissingDependencyError


class FakeBatchEngine:
    """Continuous batching on a simulated clock: every ``step`` seconds, each request in flight
    gets one token (its first one included), as an engine decoding a batch does."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0
        self.queues: dict[str, asyncio.Queue] = {}
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self._ticker: asyncio.Task | None = None

    def clock(self) -> float:
        return self.now

    async def _tick(self) -> None:
        while self.queues:
            for _ in range(20):  # let requests admitted after the last step join this one
                await asyncio.sleep(0)
            self.now += self.step
            for q in list(self.queues.values()):
                q.put_nowait(None)
        self._ticker = None

    async def stream(self, prompt: str, max_tokens: int, request_id: str, fixed_length: bool):
        assert request_id not in self.queues
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        self.prompts.append(prompt)
        self.max_in_flight = max(self.max_in_flight, len(self.queues))
        if self._ticker is None:
            self._ticker = asyncio.ensure_future(self._tick())
        n = max_tokens if fixed_length else min(max_tokens, 3)  # "stops at end-of-sequence" after 3
        try:
            for i in range(n):
                await q.get()
                yield 1, f"<{prompt[:4]}{i}>"
        finally:
            del self.queues[request_id]


@pytest.mark.parametrize("concurrency,n_prompts,max_tokens", [(1, 3, 5), (4, 3, 6), (3, 6, 4)])
def test_level_measures_throughput_ttft_and_per_token_latency(concurrency, n_prompts, max_tokens):
    engine = FakeBatchEngine(step=0.05)
    prompts = [f"p{i}-prompt" for i in range(n_prompts)]

    async def go():
        return await serving_bench.run_level(engine, "kind", prompts, concurrency, max_tokens, clock=engine.clock)

    timings, wall = asyncio.run(go())
    n = max(n_prompts, 2 * concurrency)
    assert len(timings) == n and engine.max_in_flight == concurrency
    assert engine.prompts == [prompts[i % n_prompts] for i in range(n)]
    for t in timings:
        assert t.tokens == max_tokens
        assert t.ttft == pytest.approx(0.05)  # the first step after joining
        assert t.per_token == pytest.approx(0.05)  # one token per step
    waves = -(-n // concurrency)
    assert wall == pytest.approx(waves * max_tokens * 0.05)
    s = serving_bench.summarize(timings, wall)
    assert s["output_tokens"] == n * max_tokens and s["requests"] == n
    assert s["output_tokens_per_second"] == pytest.approx(n * max_tokens / (waves * max_tokens * 0.05))
    assert s["ttft_p50"] == pytest.approx(0.05) and s["per_token_p90"] == pytest.approx(0.05)


def test_ttft_grows_when_requests_queue_behind_a_slow_prefill():
    """A fake engine whose first token costs ``prefill`` and later ones ``decode``: the numbers
    come out per request, and percentiles separate the slow from the fast."""

    class Engine:
        def __init__(self):
            self.now = 0.0

        async def stream(self, prompt, max_tokens, request_id, fixed_length):
            prefill = 0.5 if prompt == "long" else 0.1
            self.now += prefill
            yield 1, "a"
            for _ in range(max_tokens - 1):
                self.now += 0.02
                yield 1, "b"

    engine = Engine()
    timings, wall = asyncio.run(serving_bench.run_level(engine, "k", ["long", "short"], 1, 11,
                                                        clock=lambda: engine.now))
    assert [round(t.ttft, 6) for t in timings] == [0.5, 0.1]
    assert all(t.per_token == pytest.approx(0.02) for t in timings)
    s = serving_bench.summarize(timings, wall)
    assert s["ttft_mean"] == pytest.approx(0.3) and s["ttft_p90"] == pytest.approx(0.1 + 0.9 * 0.4)
    assert s["output_tokens_per_second"] == pytest.approx(22 / (0.6 + 20 * 0.02))
    assert serving_bench.percentile([], 0.5) is None


def test_measure_answers_every_prompt_then_times_every_kind_and_concurrency():
    engine = FakeBatchEngine(step=0.01)
    prompts = {"short_qa": ["q1", "q2"], "chinese": ["你好世界"]}
    seen: list[str] = []
    result = asyncio.run(serving_bench.measure(engine, [1, 2], 4, prompts, on_step=seen.append))
    assert result["answers"]["short_qa"] == [{"prompt": "q1", "answer": "<q10><q11><q12>"},
                                             {"prompt": "q2", "answer": "<q20><q21><q22>"}]
    assert result["answers"]["chinese"][0]["answer"].startswith("<你好世界0>")
    assert [(lv["kind"], lv["concurrency"]) for lv in result["levels"]] == \
        [("short_qa", 1), ("short_qa", 2), ("chinese", 1), ("chinese", 2)]
    assert all(lv["output_tokens"] == 4 * lv["requests"] for lv in result["levels"])
    assert seen == ["answers", "short_qa x1", "short_qa x2", "chinese x1", "chinese x2"]
    assert len(seen) == serving_bench.steps(prompts, [1, 2])
    assert set(serving_bench.PROMPTS) == {"short_qa", "code", "chinese", "reasoning"}


def _fake_output(folder: Path, base: Path, scheme: str, size: int, ppl: float, kl: float, acc: float | None):
    folder.mkdir(parents=True)
    report = {"model": str(base), "scheme_name": scheme, "size_bytes": {"base": 1_000_000, "quantized": size},
              "evaluation": {"perplexity_base": 10.0, "perplexity_quantized": ppl, "kl_mean": kl,
                             "top1_agreement": 0.9}}
    if acc is not None:
        report["tasks"] = {"tasks": {"quantkit_mc": {"acc": {"base": 0.5, "quantized": acc}}}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_benchmark_writes_json_markdown_and_plots(tmp_path):
    """The orchestration with a runner that measures the fake engine in-process: each distinct
    base once, then each checkpoint; quality from the reports; a failing model is reported."""
    from matplotlib.image import imread

    base = tmp_path / "base-model"
    base.mkdir()
    a = _fake_output(tmp_path / "w4", base, "W4A16-g64", 300_000, 10.8, 0.05, 0.45)
    b = _fake_output(tmp_path / "w8", base, "W8A8", 550_000, 10.1, 0.01, None)
    steps = {"base": 0.02, "w4": 0.01}
    calls = []

    def runner(model: BenchModel, settings: BenchSettings, stem: Path, step) -> dict:
        calls.append((model.role, model.path, stem.parent))
        if model.path.name == "w8":
            return {"loads": False, "error": "ValueError: no kernel | here"}
        engine = FakeBatchEngine(steps["base" if model.role == "base" else model.path.name])

        measured = asyncio.run(serving_bench.measure(engine, settings.concurrencies, settings.max_tokens,
                                                     settings.prompts(), step, clock=engine.clock))
        return {"loads": True, "load_seconds": 3.0, "vllm_version": "fake", **measured}

    settings = BenchSettings([1, 2], 4, "cpu", "bfloat16", 512, 2, 60)
    data = benchmark([a, b], tmp_path / "bench", settings, runner, quiet=True)
    assert [(r, p) for r, p, _ in calls] == [("base", base), ("quantized", a), ("quantized", b)]
    names = [m["name"] for m in data["models"]]
    assert names == ["base (base-model)", "w4 (W4A16-g64)", "w8 (W8A8)"]
    base_m, w4, w8 = data["models"]
    assert base_m["quality"] == {"perplexity": 10.0, "task_accuracy": 0.5}
    assert w4["quality"] == {"perplexity": 10.8, "kl_mean": 0.05, "top1_agreement": 0.9, "task_accuracy": 0.45}
    assert w4["size_bytes"] == 300_000 and base_m["size_bytes"] == 1_000_000
    # the fake engine steps twice as fast for w4: twice the throughput at each concurrency
    for lb, lq in zip(base_m["serving"]["levels"], w4["serving"]["levels"]):
        assert lq["output_tokens_per_second"] == pytest.approx(2 * lb["output_tokens_per_second"])
    out = tmp_path / "bench"
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(data))
    md = (out / "bench.md").read_text()
    assert "| w8 (W8A8) | 0.001 GB | 10.100 | 0.0100 | 90.0% | - | - | - | failed: ValueError: no kernel / here |" in md
    lv = w4["serving"]["levels"][0]
    assert (f"| w4 (W4A16-g64) | short_qa | 1 | {lv['output_tokens_per_second']:.1f} | "
            f"{lv['requests_per_second']:.2f} | 10.0 / 10.0 | 10.0 / 10.0 |") in md
    assert "```text\n<请用三句0><请用三句1>" in md  # the Chinese answers are kept as text
    for png in ("quality_vs_size.png", "quality_vs_speed.png", "throughput.png"):
        assert f"![{png}]({png})" in md
        assert imread(out / png).shape[2] in (3, 4)


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(MissingDependencyError) as err:
        vllm_python(None)
    assert err.value.hint.startswith("pip install 'quantkit[vllm]'")
    assert vllm_python("/some/python") == "/some/python"
    assert main(["bench", str(tmp_path)]) == 2
    line = capsys.readouterr().err
    assert line.startswith("error: vLLM is not installed (quantkit bench needs it); pip install 'quantkit[vllm]'")
    assert line.count("\n") == 1
