"""Background jobs (the work folder's writes, the export) run their device work on a stream of
their own, after the work the submitter had queued (run with: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from quantkit.background import OneInFlight
from quantkit.host_copy import to_host

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_job_sees_the_submitters_queued_work_and_runs_on_its_own_stream():
    a = torch.randn(4096, 4096, device="cuda")
    out = torch.zeros_like(a)
    torch.cuda.synchronize()
    for _ in range(20):  # queued, not finished, when the job starts
        out = out + a @ a * 1e-3
    seen: dict[str, object] = {}

    def job() -> None:
        seen["stream"] = torch.cuda.current_stream()
        seen["copy"] = to_host(out)

    worker = OneInFlight("test")
    try:
        worker.submit(job)
        worker.wait()
    finally:
        worker.close()
    expected = out.cpu()
    assert seen["stream"] != torch.cuda.default_stream()
    assert torch.equal(seen["copy"], expected)


def test_to_host_copies_into_page_locked_memory_below_the_limit():
    t = torch.randn(1000, 33, device="cuda")[:, :32]  # not contiguous
    host = to_host(t)
    assert host.is_pinned() and host.device.type == "cpu"
    assert torch.equal(host, t.cpu())
