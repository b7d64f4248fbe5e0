"""A recipe's ``tune:`` section: refused at load time where ``quantkit tune`` could not tune what
the run writes."""

from __future__ import annotations

import pytest

from quantkit.errors import RecipeError
from quantkit.recipe import make_recipe

GPTQ_W4A16 = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False}
TUNE = {"steps": 2, "batch_size": 2, "lr": 1e-2}  # every setting, none its default: each must reach the tuning


def recipe(quant: dict | None = None, tune: dict | None = None, **sections) -> dict:
    data = {"model": {"id": "org/model"}, "quantization": quant or GPTQ_W4A16,
            "export": {"output_dir": "/tmp/quantkit-never-written"}, "device": "cpu", **sections}
    if tune is not None:
        data["tune"] = tune
    return data


def test_tune_is_off_unless_asked_and_keeps_only_the_settings_given():
    assert make_recipe(recipe()).tune is None
    assert make_recipe(recipe(tune={})).tune.flags() == []
    assert make_recipe(recipe(tune={"batch_size": 4})).tune.settings() == {"batch_size": 4}
    assert make_recipe(recipe(tune=TUNE)).tune.flags() == ["--steps", "2", "--lr", "0.01", "--batch-size", "2"]


@pytest.mark.parametrize("quant", [
    {"method": "rtn", "scheme": "W4A16"},
    {"method": "rtn", "scheme": "W8A16"},
    {"method": "awq"},
    GPTQ_W4A16,
])
def test_tune_accepts_weight_only_int_schemes_in_compressed_tensors(quant):
    assert make_recipe(recipe(quant, tune={"steps": 4}, export={"output_dir": "/tmp/x",
                                                                "format": "compressed-tensors"})).tune.steps == 4


@pytest.mark.parametrize("data,needle", [
    (recipe(tune={}, export={"output_dir": "/tmp/x", "format": "gptq"}), "export.format 'gptq'"),
    (recipe({"method": "awq"}, tune={}, export={"output_dir": "/tmp/x", "format": "awq"}), "export.format 'awq'"),
    (recipe({"method": "rtn", "scheme": "W8A8"}, tune={}), "not W8A8"),
    (recipe({"method": "rtn", "scheme": "W4AFP8", "group_size": 128}, tune={}), "not W4AFP8"),  # pack-quantized too
    (recipe({"method": "rtn", "scheme": "NVFP4A16"}, tune={}), "not NVFP4A16"),
    (recipe({**GPTQ_W4A16, "online_down_proj": True}, tune={}), "online_down_proj"),
    (recipe({**GPTQ_W4A16, "overrides": [{"targets": ["re:.*down_proj$"], "bits": 8}]}, tune={}), "one scheme"),
    (recipe(tune={}, calibration={"source": "self"}), "'self'"),
    (recipe(tune={}, calibration={"text_column": "content"}), "calibration.text_column"),
    (recipe(tune={}, evaluate={"split": "test"}), "evaluate.split"),
])
def test_tune_is_refused_where_quantkit_tune_could_not_tune_the_output(data, needle):
    with pytest.raises(RecipeError) as e:
        make_recipe(data)
    assert e.value.field == "tune"
    assert "field 'tune'" in str(e.value) and needle in str(e.value)


def test_unused_text_fields_do_not_block_tune():
    """evaluate.split is recorded nowhere, but with evaluation off tune never reads it."""
    assert make_recipe(recipe(tune={}, evaluate={"enabled": False, "split": "test"})).tune is not None


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0)])
def test_tune_settings_must_be_positive(field, value):
    with pytest.raises(RecipeError) as e:
        make_recipe(recipe(tune={field: value}))
    assert e.value.field == f"tune.{field}" and "greater than 0" in str(e.value)
