"""The library warm-up: its steps end before the engine starts, a failing step never stops a run,
and (on a GPU: ``pytest -m gpu``) each step really makes its call and leaves the checkpoint as
it was."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from quantkit import pipeline, warmup
from quantkit.recipe import make_recipe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_join_waits_for_every_step_run_in_order_off_the_callers_thread():
    seen: list[tuple[str, str]] = []

    def slow():
        time.sleep(0.2)
        seen.append(("slow", threading.current_thread().name))

    def fast():
        seen.append(("fast", threading.current_thread().name))

    warm = warmup.Warmup(torch.device("cpu"))
    warm.add([slow])
    warm.add([fast])
    warm.join()
    assert [name for name, _ in seen] == ["slow", "fast"]
    assert all(thread != threading.current_thread().name for _, thread in seen)


def test_a_failing_step_is_logged_and_the_next_still_runs(caplog):
    ran = []

    def broken():
        raise RuntimeError("no such library")

    warm = warmup.Warmup(torch.device("cpu"))
    with caplog.at_level(logging.DEBUG, logger="quantkit.warmup"):
        warm.add([broken, lambda: ran.append(1)])
        warm.join()
    assert ran == [1]
    assert "no such library" in caplog.text


def test_a_cpu_run_starts_no_thread():
    from quantkit.quantizers.gptq import GPTQParams

    warm = warmup.start(torch.device("cpu"), GPTQParams())
    assert warm._executor is None
    assert warmup.attention_steps(torch.device("cpu"), torch.bfloat16, 4, 64) == []


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("asym", [False, True, None])
def test_each_step_makes_its_call_on_the_gpu(asym, monkeypatch):
    """Called directly (not through the thread that only logs), no step fails: the warm-up is
    not silently a no-op. The GPTQ step is there exactly when the recipe runs GPTQ."""
    device = torch.device("cuda")
    launches = []
    real = warmup.gptq_block_kernel.quantize_block
    monkeypatch.setattr(warmup.gptq_block_kernel, "quantize_block",
                        lambda *a: launches.append(a) or real(*a))
    steps = warmup.library_steps(device, asym) + warmup.attention_steps(device, torch.bfloat16, 8, 128)
    for step in steps:
        step()
    torch.cuda.synchronize()
    assert len(launches) == (0 if asym is None or not warmup.gptq_block_kernel.available(device) else 1)
    if launches:
        assert (launches[0][3] is not None) == asym
        assert real(*launches[0]) is not None  # the kernel ran (None: it failed and turned itself off)


@pytest.mark.gpu
@cuda
def test_the_steps_warm_float32_kernels_while_another_thread_builds_a_bf16_model(monkeypatch):
    """transformers sets the process's default dtype to bf16 while it builds a model; the steps
    still hand float32 blocks to the GPTQ kernel, which would otherwise fail to compile and turn
    itself off for the process (its torch loop rounds differently: codes depending on timing)."""
    device = torch.device("cuda")
    launches = []
    real = warmup.gptq_block_kernel.quantize_block
    monkeypatch.setattr(warmup.gptq_block_kernel, "quantize_block", lambda *a: launches.append(a) or real(*a))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for step in warmup.library_steps(device, True):
            step()
    finally:
        torch.set_default_dtype(before)
    torch.cuda.synchronize()
    assert launches and all(t.dtype == torch.float32 for t in launches[0][:4])
    assert warmup.gptq_block_kernel.available(device)


@pytest.mark.gpu
@cuda
def test_the_warm_up_leaves_the_checkpoint_byte_for_byte(tiny_llama, tmp_path, monkeypatch):
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(3, 300, (16, 64), generator=torch.Generator().manual_seed(0))}, str(ids))
    quant = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False}
    files = []
    for name in ("warm", "cold"):
        if name == "cold":
            monkeypatch.setattr(warmup, "library_steps", lambda *a: [])
            monkeypatch.setattr(warmup, "attention_steps", lambda *a: [])
        out = tmp_path / name
        recipe = {"model": {"id": str(tiny_llama)}, "quantization": quant,
                  "calibration": {"source": str(ids), "num_samples": 16, "max_seq_length": 64, "batch_size": 4},
                  "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cuda"}
        pipeline.run(make_recipe(recipe), quiet=True)
        files.append({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
    assert files[0] and files[0] == files[1]
