"""The online down_proj Hadamard (issue 20, point 2): the weight side fused, the activation side
written as compressed-tensors ``transform_config`` for vLLM. What vLLM does at run time is
reproduced here (``x·H_b/√b`` per block on down_proj's input, from the written config and the
written transform tensor) on the exported checkpoint loaded by transformers: it computes what
the same recipe without the option exports, to float tolerance (float32 tiny models: 1e-4
relative; a missing or transposed Hadamard moves logits by O(1)). What vLLM would not apply is
refused in one line before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit.errors import ModelError, RecipeError
from quantkit.graph.runtime import ModelRunner
from quantkit.model import ModelSource
from quantkit.rotation.online import (DownProjHadamard, block_size, fuse_into_weight, normalized_block,
                                      online_hadamard)
from tests.tiny_models import make_tiny_model

INTERMEDIATE = 192  # 3 blocks of 64: the block-diagonal case


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    return lambda arch, intermediate=INTERMEDIATE: make_tiny_model(
        root / f"{arch}-{intermediate}", arch=arch, layers=2, hidden=128, intermediate=intermediate)


@pytest.mark.parametrize("n,block", [(1536, 512), (14336, 2048), (4864, 256), (192, 64), (1 << 16, 1 << 15)])
def test_block_is_the_largest_power_of_two_vllm_takes(n, block):
    assert block_size(n) == block


def test_fused_weight_and_online_input_keep_the_linear_function():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, INTERMEDIATE, dtype=torch.float64, generator=gen)
    w = torch.randn(32, INTERMEDIATE, dtype=torch.float64, generator=gen)
    fused = w.clone()
    fuse_into_weight(fused, 64)
    h = normalized_block(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (fused - w).abs().max() > 0.1 * w.abs().max()
    torch.testing.assert_close(online_hadamard(x, h) @ fused.T, x @ w.T, rtol=1e-12, atol=1e-12)
    # block-diagonal: channels of one block never mix with another's
    x0 = torch.zeros_like(x)
    x0[:, :64] = x[:, :64]
    assert online_hadamard(x0, h)[:, 64:].abs().max() == 0


def _vllm_input_transform(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """What vLLM's CompressedTensorsLinearTransformMethod does: every Linear whose checkpoint
    name matches the scheme's targets gets ``x ← x·W/√b`` before its own forward, W the loaded
    ``<linear>.R4_input.weight`` (the dense path; hadacore computes the same Sylvester blocks)."""
    import re

    from compressed_tensors.transform import TransformConfig, deterministic_hadamard_matrix

    parsed = TransformConfig.model_validate(config["quantization_config"]["transform_config"])
    (name, scheme), = parsed.config_groups.items()
    (args,) = scheme.apply
    assert scheme.type == "hadamard" and args.location == "input" and not args.inverse and not scheme.randomize
    hooked = 0
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(re.match(t[3:], module_name) for t in args.targets):
            w = tensors[f"{module_name}.{name}_input.weight"].to(torch.float64)
            # the Sylvester matrix vLLM's hadacore kernel is tested against (its test_hadacore.py)
            assert torch.equal(w, deterministic_hadamard_matrix(scheme.head_dim, torch.float64))
            h = w / scheme.head_dim ** 0.5
            module.register_forward_pre_hook(lambda _m, a, h=h: (online_hadamard(a[0], h),))
            hooked += 1
    return hooked


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_exported_checkpoint_with_vllms_transform_computes_the_plain_export(families, tmp_path, arch):
    """RTN W8 on every Linear but down_proj (left in float, so the Hadamard is the only
    difference): the option's checkpoint plus vLLM's input transform gives the logits of the
    checkpoint written without the option; without the transform it does not."""
    import transformers
    from safetensors.torch import load_file

    from quantkit.evaluate import evaluate_checkpoint
    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    model_dir = families(arch)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, plain_down = {}, None
    for online in (False, True):
        out = tmp_path / str(online)
        run(make_recipe({
            "model": {"id": str(model_dir)},
            "quantization": {"method": "rtn", "bits": 8, "group_size": -1, "online_down_proj": online,
                             "ignore": [r"re:.*mlp\.down_proj$"]},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"}), quiet=True)
        config = json.loads((out / "config.json").read_text())
        tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False))
        loaded.eval()
        if online:
            with pytest.raises(ModelError) as e:  # transformers would run it without the transform
                evaluate_checkpoint(out)
            assert "transform_config" in str(e.value) and e.value.field == "checkpoint"
            down = tensors["model.layers.0.mlp.down_proj.weight"].double()
            fuse_into_weight(plain_down, 64)
            torch.testing.assert_close(down, plain_down, rtol=1e-6, atol=1e-6)
            with torch.no_grad():
                logits["untransformed"] = loaded(ids).logits
            assert _vllm_input_transform(loaded, config, tensors) == 2
        else:
            assert config["quantization_config"]["transform_config"] == {}
            plain_down = tensors["model.layers.0.mlp.down_proj.weight"].double()
        with torch.no_grad():
            logits[online] = loaded(ids).logits
    want = logits[False]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(logits[True], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert (logits["untransformed"] - want).abs().max() > 0.05 * want.abs().max()


def test_the_runner_streams_the_model_vllm_will_run(families):
    """Calibration and evaluation see the fused weight with the online transform: the streamed
    logits are the base model's."""
    source = ModelSource.open(str(families("llama")), None, False, None)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))

    def logits(runner: ModelRunner) -> torch.Tensor:
        (inp,) = runner.capture([ids])
        hidden = inp.hidden
        with torch.no_grad():
            for i in range(runner.num_layers):
                hidden = runner.run_layer(runner.load_layer(i), hidden, inp.calls[i])
            return runner.logits(hidden, ids)

    base = ModelRunner(source, torch.device("cpu"), torch.float32)
    edited = ModelRunner(source, torch.device("cpu"), torch.float32)
    edited.edits.append(DownProjHadamard(edited.graph, edited.names, [], "compressed-tensors", "model"))
    want = logits(base)
    torch.testing.assert_close(logits(edited), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _recipe(model_dir, tmp_path, export=None, **quant):
    from quantkit.recipe import make_recipe

    return make_recipe({"model": {"id": str(model_dir)},
                        "quantization": {"method": "rtn", "bits": 4, "group_size": 64, "online_down_proj": True,
                                         **quant},
                        "export": {"output_dir": str(tmp_path / "out"), **(export or {})}, "device": "cpu"})


def test_validation_refuses_what_vllm_would_not_apply(families, tmp_path):
    from quantkit import preflight

    with pytest.raises(RecipeError) as e:  # AWQ's scales do not commute with the Hadamard
        _recipe(families("llama"), tmp_path, method="awq", symmetric=False)
    assert "online_down_proj" in str(e.value)
    with pytest.raises(RecipeError) as e:
        preflight.check(_recipe(families("llama"), tmp_path, export={"format": "gptq"}))
    assert e.value.field == "quantization.online_down_proj" and "gptq" in str(e.value)
    for arch, intermediate, why in (("qwen2_moe", INTERMEDIATE, "fused MoE"), ("llama", 125, "odd")):
        with pytest.raises(ModelError) as e:
            preflight.check(_recipe(families(arch, intermediate), tmp_path))
        assert e.value.field == "quantization.online_down_proj"
        assert why in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert preflight.check(_recipe(families("llama"), tmp_path)).method == "rtn"
