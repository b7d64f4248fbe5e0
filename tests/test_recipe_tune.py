"""A recipe's ``tune:`` section: refused at load time where ``quantkit tune`` could not tune what
the run writes, and otherwise ``run`` ends with the same tuning ``quantkit tune`` gives, or with
the untuned checkpoint published and an error saying how to tune it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from quantkit import pipeline, preflight
from quantkit.errors import NumericsError, RecipeError
from quantkit.folder_tuning import tune_folder
from quantkit.recipe import make_recipe
from quantkit.scale_tuning import TUNED_SUFFIX
from quantkit.tune_settings import TuneSettings

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
])
def test_tune_is_refused_where_quantkit_tune_could_not_tune_the_output(data, needle):
    with pytest.raises(RecipeError) as e:
        make_recipe(data)
    assert e.value.field == "tune"
    assert "field 'tune'" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0)])
def test_tune_settings_must_be_positive(field, value):
    with pytest.raises(RecipeError) as e:
        make_recipe(recipe(tune={field: value}))
    assert e.value.field == f"tune.{field}" and "greater than 0" in str(e.value)


def _run(tiny_llama, text_file, out, quant=GPTQ_W4A16, tune=None):
    data = recipe(quant, tune, model={"id": str(tiny_llama)},
                  calibration={"source": str(text_file), "num_samples": 8, "max_seq_length": 32, "batch_size": 4},
                  evaluate={"source": str(text_file), "num_samples": 2, "max_seq_length": 32},
                  export={"output_dir": str(out)})
    return pipeline.run(make_recipe(data), quiet=True)


def _tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _published_bytes(folder):
    """The shards and JSON files of an output folder, less report.json (which holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name != "report.json"}


@pytest.fixture(scope="module")
def untuned(tiny_llama, text_file, tmp_path_factory):
    """The GPTQ W4A16 run without ``tune:``."""
    out = tmp_path_factory.mktemp("untuned") / "out"
    _run(tiny_llama, text_file, out)
    return out


def test_run_with_tune_writes_what_quantkit_tune_gives(tiny_llama, text_file, untuned, tmp_path):
    """The tuned run's shards are the untuned run's tuned by ``tune_folder`` with the same
    settings, bit for bit; report.json, the returned report and the card say it was tuned."""
    out = tmp_path / "tuned"
    report = _run(tiny_llama, text_file, out, tune=TUNE)

    by_hand = tmp_path / "by-hand"
    shutil.copytree(untuned, by_hand)
    tune_folder(by_hand, steps=2, lr=1e-2, batch_size=2, seed=0, device="cpu", quiet=True)

    tuned, plain, expect = _tensors(out), _tensors(untuned), _tensors(by_hand)
    scales = [k for k in tuned if k.endswith(".weight_scale")]
    assert scales and any(not torch.equal(tuned[k], plain[k]) for k in scales)
    assert tuned.keys() == expect.keys()
    assert [k for k in tuned if not torch.equal(tuned[k], expect[k])] == []

    written = json.loads((out / "report.json").read_text())
    assert written["tuning"]["steps"] == 2 and written["tuning"]["batch_size"] == 2
    assert written["tuning"]["windows"] == 8
    assert report["tuning"] == written["tuning"]
    assert "tuned end to end" in (out / "README.md").read_text()
    assert not list(out.glob(f"*{TUNED_SUFFIX}"))


def test_a_failed_tuning_leaves_the_untuned_checkpoint_published(tiny_llama, text_file, untuned, tmp_path,
                                                                   monkeypatch):
    import quantkit.scale_tuning

    def diverge(*args, **kwargs):
        raise NumericsError("tune: the KL became nan at step 1; nothing was written", field="--lr", value=1e-2,
                            hint="try a smaller --lr")

    monkeypatch.setattr(quantkit.scale_tuning, "tune", diverge)
    out = tmp_path / "out"
    with pytest.raises(NumericsError) as e:
        _run(tiny_llama, text_file, out, tune=TUNE)
    message = str(e.value)
    assert f"{out} holds the untuned quantized checkpoint" in message
    assert f"quantkit tune {out} --num-samples 8 --steps 2 --lr 0.01 --batch-size 2 --seed 0" in message
    assert "try a smaller --lr" in message and e.value.field == "--lr"
    assert _published_bytes(out) == _published_bytes(untuned)
    assert "tuning" not in json.loads((out / "report.json").read_text())
    assert not list(out.glob(f"*{TUNED_SUFFIX}"))


def _rtn_recipe(tiny_llama, text_file, out, tune, seed=0):
    return make_recipe(recipe({"method": "rtn", "scheme": "W4A16", "group_size": 64}, tune,
                              model={"id": str(tiny_llama)}, evaluate={"enabled": False},
                              calibration={"source": str(text_file), "num_samples": 4, "max_seq_length": 32,
                                           "seed": seed},
                              export={"output_dir": str(out)}))


def test_rtn_tunes_on_the_calibration_it_did_not_read(tiny_llama, text_file, tmp_path):
    """RTN reads no text to quantize, yet the plan checks the calibration (tuning reads it),
    lists the tuning, and the run tunes on calibration.num_samples windows."""
    out = tmp_path / "rtn"
    plan = preflight.check(_rtn_recipe(tiny_llama, text_file, out, TUNE))
    assert plan.calibration is not None and plan.to_dict()["tune"] == ["--steps", "2", "--lr", "0.01",
                                                                       "--batch-size", "2"]
    assert f"tune         then `quantkit tune {out} --steps 2 --lr 0.01 --batch-size 2` on it" in plan.to_text()

    report = pipeline.run(_rtn_recipe(tiny_llama, text_file, out, TUNE), quiet=True)
    assert report["calibration"]["num_samples"] == 0
    assert report["tuning"]["windows"] == 4


def test_empty_tune_section_tunes_with_quantkit_tunes_defaults(tiny_llama, text_file, tmp_path, monkeypatch):
    """``tune: {}`` tunes with TuneSettings' defaults and the calibration's seed."""
    from quantkit import folder_tuning

    seen = []

    def record(checkpoint, base_dir, calibration, settings, *args, **kwargs):
        seen.append(settings)
        raise RuntimeError("recorded")

    monkeypatch.setattr(folder_tuning, "tune_checkpoint", record)
    with pytest.raises(RuntimeError, match="recorded"):
        pipeline.run(_rtn_recipe(tiny_llama, text_file, tmp_path / "out", {}, seed=3), quiet=True)
    assert seen == [TuneSettings(seed=3)]


def test_a_plan_without_tune_says_nothing_of_it(tiny_llama):
    plan = preflight.check(make_recipe(recipe(model={"id": str(tiny_llama)}, evaluate={"enabled": False})))
    assert plan.tune is None and plan.to_dict()["tune"] is None
    assert "\ntune " not in plan.to_text()


def test_tune_rereads_text_from_the_runs_own_columns(tiny_llama, text_file, tmp_path, monkeypatch):
    """A run whose calibration and evaluation text sit in a column not named ``text`` records
    the column in report.json, and its tuning (in the run, or `quantkit tune` later) reads the
    very windows the run read."""
    from quantkit import folder_tuning
    from quantkit.calibration import TextRequest, load_tokens
    from quantkit.model import load_tokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"content": line}) + "\n"
                            for line in text_file.read_text().splitlines() if line.strip()))
    seen = []

    def record(checkpoint, base_dir, calibration, settings, device, evaluation=None, **kwargs):
        seen.append((calibration, evaluation))
        raise RuntimeError("recorded")

    monkeypatch.setattr(folder_tuning, "tune_checkpoint", record)
    out = tmp_path / "out"
    data = recipe(GPTQ_W4A16, TUNE, model={"id": str(tiny_llama)},
                  calibration={"source": str(rows), "text_column": "content", "num_samples": 8,
                               "max_seq_length": 32, "batch_size": 4},
                  evaluate={"source": str(rows), "text_column": "content", "num_samples": 2, "max_seq_length": 32},
                  export={"output_dir": str(out)})
    with pytest.raises(RuntimeError, match="recorded"):
        pipeline.run(make_recipe(data), quiet=True)
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["text_column"] == report["evaluation"]["text_column"] == "content"
    with pytest.raises(RuntimeError, match="recorded"):
        tune_folder(out, device="cpu", quiet=True)

    tok = load_tokenizer(tiny_llama)
    cal = load_tokens(TextRequest(str(rows), 8, 32, text_column="content"), tok, tiny_llama)
    ev = load_tokens(TextRequest(str(rows), 2, 32, True, 0, False, text_column="content", section="evaluate"),
                     tok, tiny_llama)
    assert len(seen) == 2
    for calibration, evaluation in seen:
        assert [t.tolist() for t in calibration] == [t.tolist() for t in cal]
        assert [t.tolist() for t in evaluation] == [t.tolist() for t in ev]


def test_the_memory_estimate_meets_what_tune_held_at_8b_shapes():
    """tune_bytes against tune's own peaks measured on an H200 at Llama-3.1-8B shapes, one
    2048-token window a step, base in bf16 (docs/quality.md, stops 44 and 45): with bf16
    products (and attention) the whole 32 layers held 66.6 GiB, 2 layers 15.7; with float32
    products 86.1 (stop 44, its attention in float32 as now). The whole model within 5%; the
    short one, whose peak is mostly the logits, may be exceeded (a refusal errs safe) by 20% at
    most but not undercut."""
    from quantkit.tune_memory import tune_bytes

    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336

    def estimate(layers: int, products: torch.dtype) -> float:
        quantized = layers * layer
        parameters = quantized + 2 * 128256 * 4096 + (2 * layers + 1) * 4096
        return tune_bytes(parameters, quantized, quantized // 128, 4, 2, layers, 4096 + 14336, 128256, 2048,
                          products) / 2**30

    for products, measured in ((torch.bfloat16, 66.6), (torch.float32, 86.1)):
        assert abs(estimate(32, products) - measured) < 0.05 * measured, (products, estimate(32, products))
    assert 15.7 <= estimate(2, torch.bfloat16) < 1.2 * 15.7, estimate(2, torch.bfloat16)
    # An 80 GB card (about 85e9 bytes as CUDA counts them) now holds the 8B's tune; it did not.
    assert estimate(32, torch.bfloat16) * 2**30 < 85 * 10**9 < estimate(32, torch.float32) * 2**30


def test_a_tuning_that_cannot_fit_the_gpu_is_refused_before_the_run():
    from quantkit.preflight import check_tune_fits

    check_tune_fits(60 * 10**9, 85 * 10**9, "cuda:0", 1, "r.yaml")
    with pytest.raises(RecipeError) as e:
        check_tune_fits(66 * 10**9, 25 * 10**9, "cuda:0", 8, "r.yaml")
    assert e.value.field == "tune" and "r.yaml: field 'tune': tuning would hold about 66 GB on cuda:0, which has " \
        "25 GB" in str(e.value)
    assert "tune.batch_size" in e.value.hint and "--device cpu" in e.value.hint


def test_the_plan_says_what_tuning_will_hold(tiny_llama, text_file, tmp_path):
    """On the CPU the base is held in float32 beside the codes: at least 4 bytes a parameter."""
    plan = preflight.check(_rtn_recipe(tiny_llama, text_file, tmp_path / "rtn", TUNE))
    assert plan.tune_bytes > 4 * plan.sizes.parameters
    assert f"holding about {plan.tune_bytes / 1e6:.1f} MB on cpu" in plan.to_text()


def test_no_tune_leaves_out_the_recipes_tuning(tiny_llama, text_file, tmp_path, capsys):
    """``--no-tune`` (validate and run): the plan lists no tuning and the run publishes the
    untuned checkpoint without a tuning section, as a recipe without ``tune:`` would."""
    import yaml

    from quantkit.cli import main as cli_main

    out = tmp_path / "rtn"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe({"method": "rtn", "scheme": "W4A16", "group_size": 64}, TUNE,
                                          model={"id": str(tiny_llama)}, evaluate={"enabled": False},
                                          calibration={"source": str(text_file), "num_samples": 4,
                                                       "max_seq_length": 32},
                                          export={"output_dir": str(out)})))
    for flags, tuned in (([], True), (["--no-tune"], False)):
        assert cli_main(["validate", str(path), "--json", *flags]) == 0
        assert bool(json.loads(capsys.readouterr().out)["plan"].get("tune")) is tuned
    assert cli_main(["--quiet", "run", str(path), "--no-tune"]) == 0
    assert "tuning" not in json.loads((out / "report.json").read_text())
