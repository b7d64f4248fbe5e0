"""GPTQ's column loop as one Triton kernel per block (``gptq_block_kernel``): a whole
``gptq_quantize_batch`` through it gives the torch loop's codes, scales and zero points, for
symmetric and asymmetric groups, per-channel scales, act-order, a ragged last block, stacks with
one shared and with their own Hessians. On the CPU the kernel runs under Triton's interpreter
(numpy, the same program); on a GPU (``pytest -m gpu``) compiled, on real layer widths. A
kernel that fails falls back to the torch loop with a warning."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.quantizers import gptq_block_kernel
from quantkit.quantizers.gptq import gptq_quantize_batch

from .helpers import correlated_inputs
from .test_quant_gptq import _hessian, _scheme


CASES = {
    "int4 sym g16 act-order static": (_scheme(4, True, 16), dict(act_order=True, static_groups=True)),
    "int4 asym g16 static": (_scheme(4, False, 16), dict(static_groups=True)),
    "int8 asym channel act-order": (_scheme(8, False, -1), dict(act_order=True)),
    "int4 sym g16 clip search": (_scheme(4, True, 16), dict(static_groups=True, clip_search=True)),
}


def _inputs(n_w: int, shared: bool, rows: int = 24, cols: int = 48, device: str = "cpu", seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_w, rows, cols, generator=g)
    h = torch.stack([_hessian(correlated_inputs(4 * cols, cols, g)).float() for _ in range(1 if shared else n_w)])
    h[-1, 3, :] = h[-1, :, 3] = 0.0  # a dead input column
    return w.to(device), h.to(device)


def _both(w, h, scheme, opts, monkeypatch, block_size):
    monkeypatch.setenv("QUANTKIT_TRITON", "0")
    torch_loop = gptq_quantize_batch(w, h, scheme, block_size=block_size, **opts)
    monkeypatch.setenv("QUANTKIT_TRITON", "1")
    assert gptq_block_kernel.available(w.device)
    kernel = gptq_quantize_batch(w, h, scheme, block_size=block_size, **opts)
    return torch_loop, kernel


def compare_interpreted() -> dict:
    """Every case, own and shared Hessians, the torch loop against the kernel, as JSON-able
    numbers; run in a process that set TRITON_INTERPRET=1 before importing Triton (the
    interpreter is chosen when Triton is imported)."""
    out = {}
    for case, (scheme, opts) in CASES.items():
        for shared in (False, True):
            w, h = _inputs(3, shared)
            os.environ["QUANTKIT_TRITON"] = "0"
            torch_loop = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
            os.environ["QUANTKIT_TRITON"] = "1"
            kernel = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
            out[f"{case}, {'one' if shared else 'own'} Hessian"] = {
                "kernel ran": gptq_block_kernel._state.get("kernel") is not None,
                "same codes": min(float((a.codes == b.codes).float().mean()) for a, b in zip(torch_loop, kernel)),
                "same scales": all(torch.equal(a.scale, b.scale) for a, b in zip(torch_loop, kernel)),
                "same zero points": all((a.zero_point is None and b.zero_point is None)
                                        or torch.equal(a.zero_point, b.zero_point) for a, b in zip(torch_loop, kernel)),
                "same scheme": all(a.scheme == b.scheme for a, b in zip(torch_loop, kernel)),
            }
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (the test extra installs it on Linux x86_64)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = ("import json; from tests.test_gptq_block_kernel import compare_interpreted; "
            "print(json.dumps(compare_interpreted()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shared", ["own", "one"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_gives_the_torch_loops_result(case, shared, interpreted):
    """48 columns in blocks of 32 (the second block 16 wide, padded to the kernel's 32), three
    weights; only the order of a column's float32 updates differs, so a code on a rounding
    boundary may flip."""
    got = interpreted[f"{case}, {shared} Hessian"]
    assert got["kernel ran"]
    assert got["same scales"] and got["same zero points"] and got["same scheme"]
    assert got["same codes"] >= 0.995


def test_a_failing_kernel_falls_back_to_the_torch_loop(monkeypatch, caplog):
    scheme, opts = CASES["int4 sym g16 act-order static"]
    w, h = _inputs(2, False)
    monkeypatch.setenv("QUANTKIT_TRITON", "0")
    expected = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
    monkeypatch.setenv("QUANTKIT_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # takes the kernel path on the CPU

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no C compiler")
            return launch

    monkeypatch.setitem(gptq_block_kernel._state, "kernel", Broken())
    with caplog.at_level(logging.WARNING, logger="quantkit.quantizers.gptq_block_kernel"):
        got = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
    assert "no C compiler" in caplog.text and len(caplog.records) == 1
    assert not gptq_block_kernel.available(w.device)  # off for the rest of the process
    for a, b in zip(expected, got):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_a_block_not_in_float32_is_refused_and_leaves_the_kernel_on(monkeypatch):
    """A caller's bf16 block (the warm-up's, built while transformers had made bf16 the default
    dtype) is refused before any launch; the kernel is not turned off for the process."""
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(gptq_block_kernel._state, "kernel", Kernel())
    w = torch.zeros(1, gptq_block_kernel.ROWS_PER_PROGRAM, 128, dtype=torch.bfloat16)
    hinv = torch.eye(128).unsqueeze(0)
    with pytest.raises(TypeError, match="float32 blocks.*'w': torch.bfloat16"):
        gptq_block_kernel.quantize_block(w, hinv, torch.ones_like(w), None, 0.0, 15.0)
    assert not launched and gptq_block_kernel.available(w.device)
    assert gptq_block_kernel.quantize_block(w.float(), hinv, torch.ones_like(w.float()), None, 0.0, 15.0) is not None
    assert len(launched) == 1


def test_not_taken_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not gptq_block_kernel.available(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_on_cuda_gives_the_torch_loops_result(case, monkeypatch):
    """Compiled, on a 4096-wide input with 128-column blocks and a batch of experts: codes
    nearly all equal and the same output error under the Hessian."""
    scheme, opts = CASES[case]
    w, h = _inputs(4, False, rows=512, cols=4096, device="cuda", seed=9)
    torch_loop, kernel = _both(w, h, scheme, opts, monkeypatch, block_size=128)
    for e, (a, b) in enumerate(zip(torch_loop, kernel)):
        assert torch.equal(a.scale, b.scale)
        assert (a.codes == b.codes).float().mean() >= 0.995

        def err(q):
            d = w[e] - q.dequantize()
            return float(((d @ h[e]) * d).sum())

        assert err(b) <= 1.01 * err(a)
