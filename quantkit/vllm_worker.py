"""Runs in a Python that has vLLM (perhaps not quantkit's): serves one model with vLLM's
``AsyncLLM`` and measures it with ``serving_bench``; JSON in, JSON out.

    python vllm_worker.py SPEC.json RESULT.json PROGRESS.txt

One process per model, so base and quantized each start from an empty device and one
refusal or crash does not stop the other. Imports only the standard library, vLLM and
transformers (both in any vLLM environment); ``serving_bench`` is loaded by file path.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path


def _serving_bench():
    spec = importlib.util.spec_from_file_location("quantkit_serving_bench", Path(__file__).with_name("serving_bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class VLLMEngine:
    """``serving_bench.StreamingEngine`` over vLLM's AsyncLLM: prompts go in as token ids
    (the model's chat template applied when it has one), outputs come back as deltas."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    def token_ids(self, prompt: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    async def stream(self, prompt: str, max_tokens: int, request_id: str, fixed_length: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=fixed_length,
                                output_kind=RequestOutputKind.DELTA)
        async for out in self.engine.generate({"prompt_token_ids": self.token_ids(prompt)}, params, request_id):
            completion = out.outputs[0]
            yield len(completion.token_ids), completion.text


def _peak_rss_bytes() -> int:
    """Largest resident set of this process or any finished child (the engine core), Linux KiB -> bytes."""
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


async def _serve_and_measure(spec: dict, progress: Path, result: dict) -> None:
    import vllm
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    bench = _serving_bench()
    args = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
                disable_log_stats=True, trust_remote_code=False)
    if spec["device"] == "cpu":  # no CUDA graphs; the KV cache share is of host RAM
        args.update(enforce_eager=True, gpu_memory_utilization=0.3)
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    result.update(loads=True, load_seconds=time.perf_counter() - started, vllm_version=vllm.__version__)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec["model"], trust_remote_code=False)

        def step(name: str) -> None:
            with open(progress, "a") as f:
                f.write(name + "\n")

        result.update(await bench.measure(VLLMEngine(engine, tokenizer), spec["concurrencies"], spec["max_tokens"],
                                          spec.get("prompts"), on_step=step))
    finally:
        engine.shutdown()


def main(argv: list[str]) -> int:
    spec_path, result_path, progress = (Path(a) for a in argv)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    result: dict = {"loads": False}
    try:
        asyncio.run(_serve_and_measure(spec, progress, result))
    except Exception as e:  # reported in the table, not raised: the other model still runs
        result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result_path.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    # Run as a script, this folder heads sys.path; its module names (model, engine, ...) must
    # not shadow what vLLM imports.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main(sys.argv[1:]))
