"""Scheme presets and mixed recipes in the recipe: what validation accepts, and what it refuses
(before any weight is read) with the field at fault."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from quantkit.errors import RecipeError
from quantkit.pipeline import run
from quantkit.preflight import check
from quantkit.presets import PRESETS
from quantkit.recipe import make_recipe
from quantkit.scheme_names import scheme_name
from tests.tiny_models import make_tiny_model


def recipe(quant: dict, fmt: str | None = None, model: str = "org/model") -> dict:
    export = {"output_dir": "/tmp/quantkit-never-written"}
    if fmt:
        export["format"] = fmt
    return {"model": {"id": model}, "quantization": quant, "export": export, "evaluate": {"enabled": False},
            "device": "cpu"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_with_both_methods(method, preset):
    quant = {"method": method, "scheme": preset}
    if preset in ("W4AFP8",):
        quant["group_size"] = 128
    r = make_recipe(recipe(quant))
    want = PRESETS[preset]
    if method == "gptq" and want.weights.strategy not in ("channel", "tensor"):
        # GPTQ's default order is act-order with static groups; grouped layouts record it
        want = replace(want, weights=replace(want.weights, actorder="static"))
    assert r.quantization.scheme() == want
    assert scheme_name(r.quantization.scheme()) in (preset, f"W{PRESETS[preset].weights.num_bits}A16-g128",
                                                      "W4A16-g128-asym", "W8A8", "FP8")
    assert r.quantization.model_dump()["scheme"] == preset  # dumps as written


@pytest.mark.parametrize("quant,needle", [
    ({"method": "gptq", "scheme": "NVFP4", "bits": 8}, "fixes bits"),
    ({"method": "rtn", "scheme": "MXFP4A16", "symmetric": False}, "fixes symmetric"),
    ({"method": "rtn", "scheme": "NVFP4", "group_size": 32}, "fixed layout"),
    ({"method": "rtn", "block_structure": [64, 64]}, "needs scheme"),
    ({"method": "rtn", "scheme": "NVFP4", "block_structure": [64, 64]}, "applies to FP8_BLOCK"),
    ({"method": "gptq", "scheme": "FP8_BLOCK", "block_structure": [64, 128]}, "square"),
    ({"method": "gptq", "scheme": "NVFP5"}, "NVFP5"),
    ({"method": "gptq", "overrides": [{"targets": ["re:.*down_proj$"]}]}, "needs scheme or"),
    ({"method": "gptq", "ignore": ["re:("]}, "regular expression"),
])
def test_inconsistent_scheme_fields_name_the_field(quant, needle):
    with pytest.raises(RecipeError) as e:
        make_recipe(recipe(quant))
    assert "quantization" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("quant,fmt,needle", [
    ({"method": "gptq", "scheme": "NVFP4A16"}, "gptq", "int weights only"),
    ({"method": "gptq", "scheme": "NVFP4"}, "gptq", "weight-only"),
    ({"method": "rtn", "scheme": "W4AFP8", "group_size": 64}, None, "group_size 128"),
    ({"method": "gptq", "scheme": "MXFP4A16", "act_order": True, "static_groups": False}, None, "static_groups"),
])
def test_format_refusals(quant, fmt, needle):
    with pytest.raises(RecipeError) as e:
        make_recipe(recipe(quant, fmt))
    assert needle in str(e.value)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
@pytest.mark.parametrize("mixed", [
    {"overrides": [{"targets": ["re:.*down_proj$"], "bits": 8}]},
    {"ignore": ["re:.*\\.0\\.mlp\\.down_proj$"]},
    {"targets": ["re:.*mlp.*"]},
])
def test_awq_and_gptq_formats_refuse_mixed_recipes(fmt, mixed):
    method = "awq" if fmt == "awq" and "overrides" not in mixed else "gptq"
    quant = {"method": method, "bits": 4, "group_size": 64, "symmetric": fmt != "awq", **mixed}
    with pytest.raises(RecipeError) as e:
        make_recipe(recipe(quant, fmt))
    assert e.value.field == f"quantization.{next(iter(mixed))}"
    assert e.value.hint == "use export.format: compressed-tensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # q_proj 128 rows, k/v_proj 64 each: a 128-row FP8 block would straddle k and v
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=2, hidden=128, heads=4, kv_heads=2)


@pytest.mark.parametrize("quant,field,needle", [
    ({"method": "rtn", "bits": 4, "group_size": 64, "overrides": [{"targets": ["re:.*q_proj$"], "bits": 8}]},
     "quantization.overrides", "fuses them"),
    ({"method": "rtn", "bits": 4, "group_size": 64, "ignore": ["re:.*up_proj$"]}, "quantization.overrides",
     "fuses them"),
    ({"method": "rtn", "scheme": "FP8_BLOCK"}, "quantization.block_structure", "straddle"),
    ({"method": "rtn", "bits": 4, "group_size": 64, "targets": ["re:.*nothing$"]}, "quantization.ignore",
     "no Linear"),
])
def test_model_dependent_refusals_come_before_any_weight(model_dir, tmp_path, monkeypatch, quant, field, needle):
    from quantkit.model import ModelSource

    def no_weights(*_a, **_k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(ModelSource, "tensor", no_weights)
    data = recipe(quant, model=str(model_dir))
    data["export"]["output_dir"] = str(tmp_path / "out")
    with pytest.raises(RecipeError) as shown:  # what `quantkit validate` prints
        check(make_recipe(data))
    with pytest.raises(RecipeError) as e:
        run(make_recipe(data), quiet=True)
    assert e.value.field == shown.value.field == field and needle in e.value.message
    assert not (tmp_path / "out").exists()


def test_validation_plans_a_mixed_recipe_per_linear(model_dir, tmp_path):
    """The plan counts each scheme's Linears, checks each group size against the Linears that
    get it (64 divides every input; the float Linears have none), and sizes the checkpoint so."""
    data = recipe({"method": "rtn", "bits": 4, "group_size": 64, "ignore": ["re:model\\.layers\\.0\\.mlp\\."],
                   "overrides": [{"targets": ["re:.*down_proj$"], "bits": 8}]}, model=str(model_dir))
    data["export"]["output_dir"] = str(tmp_path / "out")
    plan = check(make_recipe(data))
    assert plan.linears == {"W4A16-g64": 2 * 4 + 2, "W8A16-g64": 1}
    by_scheme = {(g.linears, g.scheme): g for g in plan.groups}
    assert by_scheme[(("mlp.gate_proj", "mlp.up_proj"), "float")].layers == 1
    assert by_scheme[(("mlp.down_proj",), "W8A16-g64")].group_size == 64
    uniform = recipe({"method": "rtn", "bits": 4, "group_size": 64}, model=str(model_dir))
    uniform["export"]["output_dir"] = str(tmp_path / "out")
    assert check(make_recipe(uniform)).sizes.checkpoint_bytes < plan.sizes.checkpoint_bytes
