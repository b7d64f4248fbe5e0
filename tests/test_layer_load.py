"""A decoder layer's load (issue 16 point 6): one open per shard, FP8/MXFP4 sources dequantized
on the run's device, the next layer prefetched on a background thread without changing what
is loaded or losing a read error."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantkit import model as model_module
from quantkit.errors import ModelError
from quantkit.graph import prefetch
from quantkit.graph.runtime import ModelRunner
from quantkit.model import ModelSource
from quantkit.pipeline import run
from quantkit.recipe import make_recipe
from quantkit.source_dequant import float_view
from tests.test_export_e2e import read_tensors
from tests.tiny_models import make_tiny_model, write_text_file

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    """A tiny two-layer Qwen3-MoE in shards of ~200 KB, so a layer spans several of them."""
    return make_tiny_model(tmp_path_factory.mktemp("layer-load") / "qwen3_moe", arch="qwen3_moe", layers=2,
                           hidden=128, intermediate=256, heads=4, kv_heads=2, max_shard_size="200KB")


def _prefetch_anywhere(monkeypatch, free: int = 1 << 40) -> None:
    """quantkit prefetches on GPUs only; these tests drive the same thread on the CPU."""
    monkeypatch.setattr(prefetch, "free_bytes", lambda device: free)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("quantkit-prefetch") and t.is_alive()]


def test_each_shard_opened_once_per_layer(moe, monkeypatch):
    opened: list[str] = []
    real = model_module.safe_open
    monkeypatch.setattr(model_module, "safe_open", lambda path, **k: opened.append(Path(path).name) or real(path, **k))
    runner = ModelRunner(ModelSource.open(str(moe)), CPU, torch.float32)
    for i in range(runner.num_layers):
        opened.clear()
        runner.load_layer(i)
        shards = {runner.source.weight_map[s] for s in runner.layer_sources(i).values()}
        assert len(shards) > 1  # the test needs a layer spread over shards
        assert sorted(opened) == sorted(shards)
    # a handle is reopened once it has read REMAP_BYTES (its pages leave the resident memory)
    monkeypatch.setattr(model_module.ShardReader, "REMAP_BYTES", 1)
    opened.clear()
    runner.load_layer(0)
    assert len(opened) == len(runner.layer_sources(0))


# --------------------------------------------------------------------------- dequantized on the device


def _quantized_source(folder: Path, kind: str) -> ModelSource:
    """A one-shard source of FP8 block-scaled weights (partial edge blocks) or MXFP4 tensors (a
    fused expert block and a plain matrix), random codes and scales."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    if kind == "fp8":
        tensors = {"a.weight": (torch.randn(200, 300, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn),
                   "a.weight_scale_inv": torch.rand(4, 5, generator=g) + 0.01}
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    else:
        tensors = {"e.gate_up_proj_blocks": torch.randint(0, 256, (3, 64, 4, 16), generator=g, dtype=torch.uint8),
                   "e.gate_up_proj_scales": torch.randint(118, 132, (3, 64, 4), generator=g, dtype=torch.uint8),
                   "m_blocks": torch.randint(0, 256, (64, 2, 16), generator=g, dtype=torch.uint8),
                   "m_scales": torch.randint(118, 132, (64, 2), generator=g, dtype=torch.uint8)}
        config = {"quantization_config": {"quant_method": "mxfp4"}}
    save_file(tensors, str(folder / "model.safetensors"))
    return ModelSource(path=folder, config=config, weight_map={k: "model.safetensors" for k in tensors})


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_device_dequantization_equals_the_host_one(tmp_path, kind, monkeypatch):
    """Bitwise the host path's values (float32 on the host, then cast), in float32 and bfloat16;
    and the dequantization runs on the run's device: the host never holds float values."""
    view = float_view(_quantized_source(tmp_path / kind, kind))
    assert view.dequantized
    with view.reader() as r:
        for name in view.dequantized:
            for dtype in (torch.float32, torch.bfloat16):
                assert torch.equal(r.to_device(name, CPU, dtype), r.tensor(name).to(dtype)), (name, dtype)
    seen: list[torch.device] = []
    real = type(view).dequantize
    monkeypatch.setattr(type(view), "dequantize", lambda self, c, s: seen.append(c.device) or real(self, c, s))
    with view.reader() as r:
        got = {name: r.to_device(name, torch.device("meta"), torch.bfloat16) for name in view.dequantized}
    assert seen and all(d.type == "meta" for d in seen)
    with view.reader() as r:
        assert all(got[n].shape == r.tensor(n).shape and got[n].is_meta for n in got)


# --------------------------------------------------------------------------- prefetch


def test_prefetched_layers_equal_direct_reads(moe, monkeypatch):
    _prefetch_anywhere(monkeypatch)
    direct = ModelRunner(ModelSource.open(str(moe)), CPU, torch.float32)
    ahead = ModelRunner(ModelSource.open(str(moe)), CPU, torch.float32)
    assert ahead.prefetch(0)
    for i in range(ahead.num_layers):
        layer = ahead.load_layer(i)
        if i + 1 < ahead.num_layers:
            assert ahead.prefetch(i + 1)
        want = direct.load_layer(i).state_dict()
        got = layer.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not _prefetch_threads()


def test_prefetch_skipped_over_budget(moe, monkeypatch):
    runner = ModelRunner(ModelSource.open(str(moe)), CPU, torch.float32)
    assert not runner.prefetch(1)  # the CPU: never
    _prefetch_anywhere(monkeypatch, free=1000)  # a GPU with 1 kB free
    assert not runner.prefetch(1)
    assert not _prefetch_threads()
    assert runner.load_layer(1) is not None


def test_read_error_surfaces_when_its_layer_is_loaded(moe, monkeypatch):
    """Layer 1's tensor is missing: layer 0 loads and runs; loading layer 1 raises the error a
    direct read raises, naming the tensor."""
    _prefetch_anywhere(monkeypatch)
    runner = ModelRunner(ModelSource.open(str(moe)), CPU, torch.float32)
    lost = runner.layer_sources(1)["mlp.experts.2.up_proj.weight"]
    shard = runner.source.weight_map.pop(lost)
    layer0 = runner.load_layer(0)
    assert runner.prefetch(1)
    assert all(torch.isfinite(p).all() for p in layer0.parameters())
    with pytest.raises(ModelError) as prefetched:
        runner.load_layer(1)
    with pytest.raises(ModelError) as direct:
        runner.load_layer(1)
    assert prefetched.value.value == direct.value.value == lost
    assert prefetched.value.file == direct.value.file
    runner.source.weight_map[lost] = shard


def test_corrupt_shard_is_a_model_error_naming_tensor_and_file(tmp_path):
    save_file({"t": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "a.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    source = ModelSource(path=tmp_path, config={}, weight_map={"t": "a.safetensors"})
    with pytest.raises(ModelError) as e, source.reader() as r:
        r.tensor("t")
    assert (e.value.value, e.value.file) == ("t", str(tmp_path / "a.safetensors"))


def test_run_with_prefetch_writes_the_same_checkpoint_and_a_failing_layer_stops_the_thread(moe, tmp_path,
                                                                                             monkeypatch):
    text = write_text_file(tmp_path / "text.jsonl")

    def quantize(out: Path) -> dict:
        run(make_recipe({"model": {"id": str(moe)}, "quantization": {"method": "rtn", "bits": 4, "group_size": 64},
                         "calibration": {"source": str(text), "num_samples": 2, "max_seq_length": 16,
                                         "batch_size": 2},
                         "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"}),
            quiet=True)
        return read_tensors(out)

    plain = quantize(tmp_path / "plain")
    _prefetch_anywhere(monkeypatch)
    used: list[int] = []
    real = prefetch.LayerPrefetch.result
    monkeypatch.setattr(prefetch.LayerPrefetch, "result", lambda self: used.append(self.index) or real(self))
    ahead = quantize(tmp_path / "ahead")
    assert used == [1]
    assert ahead.keys() == plain.keys() and all(torch.equal(ahead[k], plain[k]) for k in plain)

    from quantkit import engine

    def fail(name, qw):
        raise RuntimeError("layer 0 fails")

    monkeypatch.setattr(engine, "check_quantized", fail)
    with pytest.raises(RuntimeError):
        quantize(tmp_path / "fails")
    assert not _prefetch_threads()
