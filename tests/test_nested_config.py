"""Multimodal configs nest the language model's config (``text_config``) and write only the
fields that differ from their class's defaults: plan, validate and eval read them through the
transformers config class, never a KeyError (``run`` is covered per family in
test_families.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from quantkit.cli import main
from quantkit.planner import ModelShape

# The shape of Gemma 3 4B's config.json: num_attention_heads, head_dim, vocab_size and
# max_position_embeddings are left to Gemma3TextConfig's defaults.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256,
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
    "torch_dtype": "bfloat16",
}


def test_shape_fills_the_text_config_defaults():
    from transformers import Gemma3TextConfig

    shape = ModelShape.from_config(GEMMA3_4B)
    d = Gemma3TextConfig()
    assert (shape.hidden_size, shape.num_layers, shape.intermediate_size) == (2560, 34, 10240)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (d.num_attention_heads, d.num_key_value_heads,
                                                                     d.head_dim)
    assert (shape.vocab_size, shape.max_position_embeddings) == (d.vocab_size, d.max_position_embeddings)
    assert shape.architecture == "Gemma3ForConditionalGeneration"


def test_plan_on_a_nested_config(tmp_path, capsys):
    model = tmp_path / "gemma3-4b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(GEMMA3_4B))
    assert main(["plan", str(model), "--gpu", "H100"]) == 0
    assert "vllm serve" in capsys.readouterr().out


def test_validate_on_a_nested_config(tmp_path, capsys):
    """validate reads the shard headers: a tiny Gemma 3 multimodal checkpoint, nested text_config."""
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "gemma3-vl", arch="gemma3-vl", layers=1, hidden=128, intermediate=256)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"id": str(model)}, "quantization": {"method": "rtn"},
                                      "export": {"output_dir": str(tmp_path / "out")}}))
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "Gemma3ForConditionalGeneration, 1 layers, hidden 128" in out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_eval_loads_a_checkpoint_without_a_causal_lm_auto_class(tmp_path, text_file):
    """Qwen2.5-VL has no AutoModelForCausalLM entry: eval uses the class config.json names."""
    from quantkit.evaluate import evaluate_checkpoint
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "qwen-vl", arch="qwen2.5-vl", layers=1, hidden=64, intermediate=128)
    got = evaluate_checkpoint(model, source=str(text_file), num_samples=1, max_seq_length=32)
    assert got["perplexity"] > 1
