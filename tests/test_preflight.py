"""One validation for `validate` and `run` (quantkit.preflight): the plan it prints, what it
refuses, and that it reads config.json and shard headers only, never a weight."""

from __future__ import annotations

import json
import math
import shutil
from collections import namedtuple

import pytest
import yaml
from safetensors.torch import load_file

import quantkit
from quantkit import model as model_module
from quantkit.cli import main
from quantkit.errors import ExportError, RecipeError
from quantkit.model import ModelSource
from tests.test_hub import hub  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class _HeadersOnly:
    """safe_open that lists a shard's tensors but refuses to hand one out."""

    def __init__(self, real):
        self.real = real

    def __enter__(self):
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        pytest.fail(f"validation read the weight {name}")

    get_slice = get_tensor


@pytest.fixture
def no_weights(monkeypatch):
    real = model_module.safe_open
    monkeypatch.setattr(model_module, "safe_open", lambda *a, **k: _HeadersOnly(real(*a, **k)))
    monkeypatch.setattr(ModelSource, "tensor", lambda self, name: pytest.fail(f"validation read the weight {name}"))


def _recipe(tmp_path, model, **sections):
    data = {"model": {"id": str(model)}, "quantization": {"method": "rtn", "bits": 4, "group_size": 64},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(tmp_path / "out")}, "device": "cpu"}
    data.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _validate_json(capsys, *argv):
    capsys.readouterr()
    rc = main(["validate", "--json", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


def test_validate_plans_from_config_and_headers_only(tiny_llama, text_file, tmp_path, capsys, no_weights):
    path = _recipe(tmp_path, tiny_llama, quantization={"method": "awq", "bits": 4, "group_size": 64},
                   calibration={"source": str(text_file), "num_samples": 8, "max_seq_length": 64})
    rc, got, _ = _validate_json(capsys, path)
    assert rc == 0 and got["valid"]
    plan = got["plan"]
    config = json.loads((tiny_llama / "config.json").read_text())
    shape = plan["shape"]
    for key, field in (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                       ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                       ("num_key_value_heads", "num_kv_heads"), ("vocab_size", "vocab_size")):
        assert shape[field] == config[key], field
    # Sizes against the weights themselves (the test may read them; validation may not).
    weights = load_file(str(tiny_llama / "model.safetensors"))
    quantized = {k: v for k, v in weights.items() if k.removesuffix(".weight").split(".", 3)[-1] in LINEARS}
    sizes = plan["sizes"]
    assert sizes["parameters"] == sum(v.numel() for v in weights.values())
    assert sizes["quantized_parameters"] == sum(v.numel() for v in quantized.values()) > 0
    assert sizes["base_bytes"] == (tiny_llama / "model.safetensors").stat().st_size
    # W4A16 asymmetric g64: half a byte per code, a 2-byte scale and half a byte of zero point per group;
    # everything else stays float32 (the tiny model's dtype).
    want = sum(o * i // 2 + o * (i // 64) * 2 + math.ceil(o * (i // 64) / 2)
               for o, i in (v.shape for v in quantized.values()))
    want += sum(v.numel() * 4 for k, v in weights.items() if k not in quantized)
    assert sizes["checkpoint_bytes"] == want
    # the work folder keeps 4-bit codes two to a byte
    assert sizes["disk_needed_bytes"] == want + sizes["quantized_parameters"] // 2
    groups = {tuple(g["linears"]): (g["in_features"], g["out_features"]) for g in plan["groups"]}
    w = {name: weights[f"model.layers.0.{name}.weight"].shape for name in LINEARS}
    assert groups[LINEARS[:3]] == (w[LINEARS[0]][1], [w[n][0] for n in LINEARS[:3]])
    assert groups[("mlp.down_proj",)] == (config["intermediate_size"], [config["hidden_size"]])
    assert plan["calibration"] == {"section": "calibration", "source": str(text_file), "kind": "file",
                                   "num_samples": 8, "max_seq_length": 64}
    assert plan["evaluate"] is None and plan["scheme"] == "W4A16-g64-asym" and plan["format"] == "compressed-tensors"
    assert {g["layers"] for g in plan["groups"]} == {config["num_hidden_layers"]}
    # The library call gives the same plan.
    again = quantkit.validate(path).to_dict()
    again["sizes"]["disk_free_bytes"] = plan["sizes"]["disk_free_bytes"]  # other processes write to the disk
    assert again == plan
    # The text form says the same things.
    assert main(["validate", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{path}: valid\n")
    assert "self_attn.q_proj, self_attn.k_proj, self_attn.v_proj: in 256" in text
    assert f"{str(text_file)} (file): 8 x 64 tokens" in text


def test_plan_counts_the_head_a_rotation_unties(tmp_path, capsys, no_weights):
    """A rotated tied model gets its own lm_head in the checkpoint: the disk the plan asks for
    includes it (one vocabulary x hidden matrix in the export dtype, float32 here)."""
    model = make_tiny_model(tmp_path / "tied", layers=1, hidden=128, intermediate=256, tied=True)
    sizes = {}
    for rotate in ("none", "hadamard"):
        path = _recipe(tmp_path, model, quantization={"method": "rtn", "bits": 4, "group_size": 64, "rotate": rotate})
        rc, got, _ = _validate_json(capsys, path)
        assert rc == 0, got
        sizes[rotate] = got["plan"]["sizes"]["checkpoint_bytes"]
    config = json.loads((model / "config.json").read_text())
    assert sizes["hadamard"] - sizes["none"] == config["vocab_size"] * config["hidden_size"] * 4


@pytest.mark.parametrize("command", ["validate", "run"])
def test_group_size_refused_alike_by_validate_and_run(tmp_path_factory, tmp_path, command, capsys, no_weights):
    model = make_tiny_model(tmp_path_factory.mktemp("odd") / "m", layers=1, hidden=192, intermediate=384, heads=3,
                            kv_heads=1)
    path = _recipe(tmp_path, model, quantization={"method": "rtn", "bits": 4, "group_size": 128})
    capsys.readouterr()
    assert main([command, str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: quantization.group_size 128 does not divide the input size 192 of self_attn.q_proj "
        "(LlamaDecoderLayer); use one of [32, 64]\n")
    rc, got, _ = _validate_json(capsys, path)
    assert rc == 2 and got["error"] == {
        "error": "RecipeError", "field": "quantization.group_size", "value": 128, "file": None,
        "hint": "use one of [32, 64]", "message": f"{path}: quantization.group_size 128 does not divide the input "
        "size 192 of self_attn.q_proj (LlamaDecoderLayer)"}


def test_too_little_disk_is_refused_by_validate(tiny_llama, tmp_path, monkeypatch, no_weights):
    from quantkit import preflight
    from quantkit.recipe import load_recipe

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError) as e:
        preflight.check(load_recipe(_recipe(tmp_path, tiny_llama)))
    assert e.value.field == "export.output_dir" and e.value.value == str(tmp_path / "out")
    assert e.value.hint == "free space or choose another folder"


def test_only_sections_that_run_are_checked(tiny_llama, tmp_path, capsys):
    """RTN uses no calibration: its (too long, missing) calibration section is not held against it;
    the evaluation section that runs is."""
    calibration = {"source": str(tmp_path / "missing.jsonl"), "max_seq_length": 4096}
    rc, got, _ = _validate_json(capsys, _recipe(tmp_path, tiny_llama, calibration=calibration))
    assert rc == 0 and got["plan"]["calibration"] is None
    path = _recipe(tmp_path, tiny_llama, calibration=calibration,
                   evaluate={"source": "shakespeare-eval", "max_seq_length": 4096})
    with pytest.raises(RecipeError) as e:
        from quantkit import preflight
        from quantkit.recipe import load_recipe

        preflight.check(load_recipe(path))
    assert (e.value.field, e.value.value) == ("evaluate.max_seq_length", 4096)


def test_missing_linear_named_before_any_weight(tiny_llama, tmp_path, no_weights):
    from safetensors.torch import save_file

    from quantkit import preflight
    from quantkit.errors import ModelError
    from quantkit.recipe import load_recipe

    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as e:
        preflight.check(load_recipe(_recipe(tmp_path, model)))
    assert e.value.value == "model.layers.1.mlp.up_proj.weight"


def test_hub_model_validated_from_headers_without_download(hub, tiny_llama, tmp_path, monkeypatch,  # noqa: F811
                                                           capsys):
    """A model on the (stand-in) Hub: config.json and the shard headers are fetched alone (ranged
    reads of each shard's first bytes), the weights are not downloaded, and the plan is the one
    the same model gets from a local folder."""
    import huggingface_hub
    from huggingface_hub import HfApi

    from tests.test_hub import TOKEN, USER

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(f"{USER}/tiny-base")
    api.upload_folder(folder_path=str(tiny_llama), repo_id=f"{USER}/tiny-base")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _, local, _ = _validate_json(capsys, _recipe(tmp_path, tiny_llama))
    rc, remote, err = _validate_json(capsys, _recipe(tmp_path, f"{USER}/tiny-base"))
    assert rc == 0, err
    local, remote = local["plan"], remote["plan"]
    assert remote["model_dir"] == f"{USER}/tiny-base" and remote["sizes"]["download_bytes"] > 0
    for key in ("shape", "groups", "scheme", "format"):
        assert remote[key] == local[key], key
    for key in ("parameters", "quantized_parameters", "shards", "checkpoint_bytes", "work_bytes"):
        assert remote["sizes"][key] == local["sizes"][key], key
    assert [p for p, _ in hub.state.ranged] == ["model.safetensors"]  # one header read
    assert not list(cache.rglob("*.safetensors"))  # and no shard downloaded


def _view_recipe(tmp_path, model):
    from quantkit.recipe import make_recipe

    return make_recipe({"model": {"id": str(model)}, "quantization": {"method": "rtn", "bits": 4, "group_size": 64},
                        "evaluate": {"enabled": False}, "export": {"output_dir": str(tmp_path / "out")},
                        "device": "cpu"})


def test_runner_takes_over_validations_view_only_when_nothing_changed(tiny_llama, tmp_path):
    """A run reuses its validation's skeleton, graph and names; a config.json, tensor set or
    dtype that differs from what validation saw gets a view of its own, never the stale one."""
    import torch
    from safetensors.torch import save_file

    from quantkit import preflight
    from quantkit.graph.runtime import ModelRunner

    m = tmp_path / "m"
    shutil.copytree(tiny_llama, m)
    cpu = torch.device("cpu")

    def runner(view, dtype=torch.float32):
        return ModelRunner(ModelSource.open(str(m)), cpu, dtype, view=view)

    _, view = preflight.check_run(_view_recipe(tmp_path, m))
    assert view.dtype == torch.float32  # the CPU run's compute dtype, not the checkpoint's
    taken = runner(view)
    assert taken.model is view.model and taken.graph is view.graph and taken.names is view.names

    _, view = preflight.check_run(_view_recipe(tmp_path, m))
    assert runner(view, torch.bfloat16).model is not view.model

    _, view = preflight.check_run(_view_recipe(tmp_path, m))
    config = json.loads((m / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (m / "config.json").write_text(json.dumps(config))
    changed = runner(view)
    assert changed.model is not view.model and changed.model.config.rms_norm_eps == config["rms_norm_eps"]

    _, view = preflight.check_run(_view_recipe(tmp_path, m))
    tensors = load_file(str(m / "model.safetensors"))
    tensors["extra.bias"] = torch.zeros(3)
    save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    renamed = runner(view)
    assert renamed.model is not view.model and "extra.bias" in renamed.names.unexpected


def test_a_run_builds_the_model_skeleton_once(tiny_llama, tmp_path, monkeypatch):
    """Validation's skeleton is the run's: the model's class is built on the meta device once."""
    from quantkit.graph import view

    built = []
    real = view.build_meta
    monkeypatch.setattr(view, "build_meta", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    quantkit.quantize(model={"id": str(tiny_llama)}, quantization={"method": "rtn", "bits": 4, "group_size": 64},
                      evaluate={"enabled": False}, export={"output_dir": str(tmp_path / "out")}, device="cpu",
                      quiet=True)
    assert len(built) == 1
