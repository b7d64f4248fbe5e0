"""Execute notebooks/quickstart.ipynb end to end and check what its cells print.

The kernel is this interpreter (a kernelspec written for ``sys.executable``), importing this
checkout's quantkit (``PYTHONPATH``), offline, without ``HF_TOKEN``: the push cell must skip.
Runs the real built-in model (SmolLM2-135M) on CPU: a few minutes on 2 cores, plus ~30 s the
first time to convert the model into ``QUANTKIT_CACHE``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
TIMEOUT_S = 1800  # per cell; the quantize cell is the long one (CPU, shared cores)
# The engine scores fake-quantized weights in fp32; transformers decompresses the exported
# checkpoint (bf16 scales and unquantized tensors) and scores in fp32 on the same windows.
PERPLEXITY_RTOL = 0.03

pytestmark = pytest.mark.slow

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def _kernel_manager(kernel_dir: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernel_dir / "quantkit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "quantkit test", "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name="quantkit-test", kernel_spec_manager=ksm)


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _cell(nb, tag: str):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QUANTKIT_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path / "kernels"), timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", cell.source[:60]

    setup = _text(_cell(nb, "setup"))
    assert str(tmp_path / "out") in setup

    plan = _text(_cell(nb, "plan"))
    assert "RTX3070-8GB" in plan and "W4A16 g64" in plan, plan

    quantize = _text(_cell(nb, "quantize"))
    m = re.search(rf"base {NUMBER}\s+quantized {NUMBER}\s+ratio {NUMBER}", quantize)
    assert m, quantize
    base, quantized = float(m[1]), float(m[2])
    assert math.isfinite(base) and math.isfinite(quantized) and base > 1
    assert 1 <= quantized / base < 2, quantize
    report = json.loads((tmp_path / "out" / "smollm2-135m-w4a16" / "report.json").read_text())
    assert report["evaluation"]["perplexity_quantized"] == pytest.approx(quantized, abs=1e-4)

    evaluate = _text(_cell(nb, "evaluate"))
    m = re.search(rf"transformers perplexity {NUMBER}\s+report {NUMBER}", evaluate)
    assert m, evaluate
    assert float(m[2]) == pytest.approx(quantized, abs=1e-4)
    assert float(m[1]) == pytest.approx(quantized, rel=PERPLEXITY_RTOL), evaluate

    generate = _text(_cell(nb, "generate"))
    m = re.search(r"generated: (.*)", generate)
    assert m and len(m[1].split()) >= 3, generate

    assert "skipped: set HF_TOKEN to push" in _text(_cell(nb, "push"))
