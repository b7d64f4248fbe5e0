"""End-to-end slice: recipe -> calibration -> layerwise GPTQ -> compressed-tensors -> reload."""

from __future__ import annotations

import json

import pytest
import torch

import quantkit
from quantkit import export, pipeline
from quantkit.errors import ExportError
from quantkit.recipe import make_recipe
from quantkit.shipped import recipe_names


def _recipe(model, text, out, **quant):
    return {
        "model": {"id": str(model)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True, **quant},
        "calibration": {"source": str(text), "num_samples": 8, "max_seq_length": 64, "batch_size": 4},
        "evaluate": {"source": str(text), "num_samples": 4, "max_seq_length": 64},
        "export": {"output_dir": str(out)},
    }


def test_checkpoint_reloads_in_transformers_with_fake_quant_logits(tiny_llama, text_file, tmp_path):
    """The exported W4A16 g128 pack-quantized checkpoint decompresses, through transformers and
    compressed-tensors, to exactly the fake-quantized model quantkit propagated layer by layer."""
    from transformers import AutoModelForCausalLM

    fake: dict[str, torch.Tensor] = {}

    def keep(i, layer, qweights):
        fake.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
        assert set(qweights) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}

    out = tmp_path / "out"
    report = pipeline.run(make_recipe(_recipe(tiny_llama, text_file, out)), quiet=True, on_layer=keep)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reference.load_state_dict(fake, strict=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(3, base.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, orig = reference(tokens).logits, loaded(tokens).logits, base(tokens).logits
    # Same weights bit for bit (scales stored in float32 here), so only summation order differs.
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, orig, atol=1e-3)  # it really is quantized
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert report["evaluation"]["perplexity_quantized"] > 0


def test_library_call_and_cli_write_identical_checkpoints(tiny_llama, text_file, tmp_path):
    import yaml

    from quantkit.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    quantkit.quantize(**_recipe(tiny_llama, text_file, a), quiet=True)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(tiny_llama, text_file, b)))
    assert main(["--quiet", "run", str(recipe_file)]) == 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_existing_output_refused_before_reading_weights(tiny_llama, text_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    from quantkit.model import ModelSource

    monkeypatch.setattr(ModelSource, "tensor", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(ExportError) as e:
        pipeline.run(make_recipe(_recipe(tiny_llama, text_file, out)), quiet=True)
    assert (e.value.field, e.value.value) == ("export.output_dir", str(out))
    assert e.value.hint == "choose another folder or set export.overwrite: true"
    assert (out / "keep.txt").read_text() == "previous"


def _previous_output(out):
    """A folder as an earlier quantkit run left it (the marker is what lets overwrite replace it)."""
    from quantkit.output_guard import MARKER, marker_text

    out.mkdir()
    (out / MARKER).write_text(marker_text())
    return out


def test_failure_leaves_previous_output_untouched(tiny_llama, text_file, tmp_path, monkeypatch):
    out = _previous_output(tmp_path / "out")
    (out / "keep.txt").write_text("previous")
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export, "export_layer", boom)  # in the export's thread: raised at the next hand-off
    recipe = _recipe(tiny_llama, text_file, out)
    recipe["export"]["overwrite"] = True
    with pytest.raises(RuntimeError, match="disk on fire"):
        pipeline.run(make_recipe(recipe), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [".quantkit-output.json", "keep.txt"]


def test_overwrite_replaces_output(tiny_llama, text_file, tmp_path):
    out = _previous_output(tmp_path / "out")
    (out / "stale.txt").write_text("old")
    recipe = _recipe(tiny_llama, text_file, out)
    recipe["export"]["overwrite"] = True
    pipeline.run(make_recipe(recipe), quiet=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_group_size_that_does_not_divide_model_is_a_recipe_error(tiny_llama, text_file, tmp_path):
    from quantkit.errors import RecipeError

    model = tiny_llama.parent / "odd"
    from tests.tiny_models import make_tiny_model

    make_tiny_model(model, layers=1, hidden=192, intermediate=384, heads=3, kv_heads=1)
    with pytest.raises(RecipeError) as err:
        pipeline.run(make_recipe(_recipe(model, text_file, tmp_path / "o")), quiet=True)
    # Checked against the layer graph's real Linear shapes: the first Linear reading the
    # 192-wide hidden state is named, and the divisors offered divide every Linear's input.
    e = err.value
    assert (e.field, e.value, e.hint) == ("quantization.group_size", 128, "use one of [32, 64]")
    assert e.message == ("recipe: quantization.group_size 128 does not divide the input size 192 of "
                         "self_attn.q_proj (LlamaDecoderLayer)")


def test_too_little_disk_is_refused_before_reading_weights(tiny_llama, text_file, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from quantkit.model import ModelSource

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(ModelSource, "tensor", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(ExportError) as e:
        pipeline.run(make_recipe(_recipe(tiny_llama, text_file, tmp_path / "out")), quiet=True)
    assert (e.value.field, e.value.value) == ("export.output_dir", str(tmp_path / "out"))
    assert e.value.message.startswith(f"export.output_dir {tmp_path / 'out'}: 0.0 GB free on its disk")


def test_recipes_ship_inside_the_package():
    assert {"smollm2-gptq", "smollm2-awq", "llama70b-awq"} <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_shipped_recipes_validate(name):
    from quantkit.recipe import load_recipe

    recipe = load_recipe(name)
    assert recipe.export.output_dir.parts[0] == "out"


def test_calibration_attention_avoids_cudnn_and_restores_the_setting(tiny_llama, text_file, tmp_path, monkeypatch):
    """The engine's forwards run attention without cuDNN (its per-shape plan costs seconds on a
    GPU), and a notebook's own setting is back once the run ends."""
    from quantkit.engine import LayerwiseEngine

    seen: list[bool] = []
    inside = []
    sdpa, engine_run = torch.nn.functional.scaled_dot_product_attention, LayerwiseEngine._run

    def recording(*args, **kwargs):
        if inside:  # not the layer-graph tracing before the run, on tiny CPU instances
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    def engine_running(self, *args, **kwargs):
        inside.append(True)
        try:
            return engine_run(self, *args, **kwargs)
        finally:
            inside.clear()

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(LayerwiseEngine, "_run", engine_running)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    pipeline.run(make_recipe(_recipe(tiny_llama, text_file, tmp_path / "out", method="rtn")), quiet=True)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
