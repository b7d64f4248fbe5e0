"""The GPU benchmark's random-weight models are their families: transformers loads each with
its own class and no missing or unexpected tensor, norms hold the model's own initial value
(Gemma's offset norms 0, others 1), and each decoder layer sits in a shard of its own."""

from __future__ import annotations

import json

import pytest
import torch

from .helpers import load_benchmark

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=512)


@pytest.mark.parametrize("shape,arch,norm_value", [("qwen3-8b", "Qwen3ForCausalLM", 1.0),
                                                   ("gemma3-12b", "Gemma3ForCausalLM", 0.0)])
def test_benchmark_model_is_its_family(tmp_path, monkeypatch, shape, arch, norm_value):
    from transformers import AutoModelForCausalLM

    bench = load_benchmark("gpu_vs_llmcompressor")
    spec = bench.SHAPES[shape]
    monkeypatch.setitem(bench.SHAPES, shape, {**spec, "config": {**spec["config"], **TINY}})
    folder = bench.build_model(shape, 2, tmp_path / "model")

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    assert norms and all(torch.all(p == norm_value) for p in norms.values())
    q = model.model.layers[1].self_attn.q_proj.weight
    assert 0.015 < q.std().item() < 0.025
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for i in range(2):
        assert {f for k, f in weight_map.items() if f".layers.{i}." in k} == {f"model-layer-{i:03d}.safetensors"}
