"""A local .gguf as ``model.id``: converted once (through transformers' own GGUF reading) to a
bf16 safetensors folder that holds the GGUF's tensors and tokenizer, then quantized like any
folder. The GGUF is written here with the ``gguf`` package from a tiny random Qwen2 model."""

from __future__ import annotations

import json

import pytest
import torch

import quantkit
from quantkit.errors import ModelError
from quantkit.model import resolve_model_dir

from .tiny_models import make_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog and then the model quantizes its layers"


def write_gguf(model_dir, path) -> None:
    """The tiny model as an F32 GGUF of architecture qwen2 with a gpt2-style BPE tokenizer."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_license("apache-2.0")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    for name, tensor in state.items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(original folder, .gguf, converted folder, cache), the cache set for the module's tests."""
    root = tmp_path_factory.mktemp("gguf")
    model_dir = make_tiny_model(root / "hf", arch="qwen2", layers=2)
    path = root / "tiny-qwen2.gguf"
    write_gguf(model_dir, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTKIT_CACHE", str(root / "cache"))
        yield model_dir, path, resolve_model_dir(str(path)), root / "cache"


def test_gguf_converts_to_the_same_model(converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, path, folder, cache = converted
    assert folder.parent == cache / "models"
    original = load_file(str(model_dir / "model.safetensors"))
    state = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert set(original) <= set(state)
    for name, tensor in original.items():
        torch.testing.assert_close(state[name], tensor.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(folder)(TEXT).input_ids == AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids
    assert "license: apache-2.0" in (folder / "README.md").read_text()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_model_dir(str(path)) == folder and (folder / "config.json").stat().st_mtime_ns == stamp


def test_gguf_quantizes_as_model_id(converted, tmp_path):
    report = quantkit.quantize(model=str(converted[1]), quantization={"method": "rtn", "bits": 4, "group_size": 32},
                               calibration={"num_samples": 2, "max_seq_length": 32}, evaluate={"enabled": False},
                               export={"output_dir": str(tmp_path / "out")}, quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" in config
    assert report["output_dir"] == str(tmp_path / "out")


def test_unreadable_gguf_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 8)
    with pytest.raises(ModelError) as err:
        resolve_model_dir(str(bad))
    assert err.value.field == "model.id" and err.value.file == str(bad)
    with pytest.raises(ModelError) as err:
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    assert err.value.field == "model.id" and err.value.value == str(tmp_path / "missing.gguf")
