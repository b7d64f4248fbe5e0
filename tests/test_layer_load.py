"""A decoder layer's load (issue 16 point 6): one open per shard, FP8/MXFP4 sources dequantized
on the run's device, read errors naming the tensor and shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantkit import model as model_module
from quantkit.errors import ModelError
from quantkit.graph.runtime import ModelRunner
from quantkit.model import ModelSource
from quantkit.source_dequant import float_view
from tests.tiny_models import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    """A tiny two-layer Qwen3-MoE in shards of ~200 KB, so a layer spans several of them."""
    return make_tiny_model(tmp_path_factory.mktemp("layer-load") / "qwen3_moe", arch="qwen3_moe", layers=2,
                           hidden=128, intermediate=256, heads=4, kv_heads=2, max_shard_size="200KB")


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


# --------------------------------------------------------------------------- read errors


def test_missing_tensor_is_a_model_error_naming_it(moe):
    """Layer 1's tensor is missing from the shard index: layer 0 loads; layer 1 raises a
    ModelError naming the tensor."""
    runner = ModelRunner(ModelSource.open(str(moe)), CPU, torch.float32)
    lost = runner.layer_sources(1)["mlp.experts.2.up_proj.weight"]
    runner.source.weight_map.pop(lost)
    assert all(torch.isfinite(p).all() for p in runner.load_layer(0).parameters())
    with pytest.raises(ModelError) as e:
        runner.load_layer(1)
    assert e.value.value == lost


def test_corrupt_shard_is_a_model_error_naming_tensor_and_file(tmp_path):
    save_file({"t": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "a.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    source = ModelSource(path=tmp_path, config={}, weight_map={"t": "a.safetensors"})
    with pytest.raises(ModelError) as e, source.reader() as r:
        r.tensor("t")
    assert (e.value.value, e.value.file) == ("t", str(tmp_path / "a.safetensors"))
