"""Bad input, as a user meets it: every case runs the CLI and checks the exact line it prints.

Each test builds the expected message with its own temporary paths and compares it with ``==``,
so rewording a message fails here on purpose: the wording is part of the interface. The CLI
prints a ``QuantkitError`` as one ``error: ...`` line on stderr and exits 2, without traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from quantkit.cli import main
from quantkit.graph.runtime import ModelRunner
from tests.tiny_models import make_tiny_model, write_text_file

FAKE_TOKEN = "hf_QuantkitFakeToken7Zq9XwV3LmN0pR"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_text_file(tmp_path_factory.mktemp("text") / "calib.jsonl")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Token and pickle caches per test, so no test sees another's cached result."""
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))


def recipe_file(tmp_path: Path, model_id: Path | str, **sections) -> Path:
    data = {
        "model": {"id": str(model_id)},
        "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
        "evaluate": {"enabled": False},
        "export": {"output_dir": str(tmp_path / "out")},
        "device": "cpu",
    }
    data.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def gptq(text_file: Path, **calibration) -> dict:
    """Sections for a calibrated run (GPTQ streams calibration through every layer)."""
    return {"quantization": {"method": "gptq", "bits": 4, "group_size": 32},
            "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 64, **calibration}}


def cli_error(capsys, *argv) -> str:
    """Run the CLI expecting a user error; return its single stderr line."""
    capsys.readouterr()
    rc = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err[:-1]


def copy_model(src: Path, dst: Path, weights: bool = True) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if weights or f.suffix != ".safetensors":
            shutil.copy(f, dst)
    return dst


def poisoned(src: Path, dst: Path, edit) -> Path:
    """A copy of the model with ``edit(state_dict)`` applied to its safetensors."""
    copy_model(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# --------------------------------------------------------------------------- the recipe


def test_malformed_yaml_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  id: x\nquantization: {method: rtn\nexport: {output_dir: out}\n")
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: line 4, column 7: malformed YAML (expected ',' or '}}', but got ':')")


def test_recipe_file_missing(tmp_path, capsys):
    from quantkit.shipped import recipe_names

    assert cli_error(capsys, "run", tmp_path / "nope.yaml") == (
        f"error: {tmp_path / 'nope.yaml'}: recipe file not found; give a recipe YAML file or a shipped recipe: "
        + ", ".join(recipe_names()))


def test_misspelled_key_suggests_the_field(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, calibration={"num_sample": 8})
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: unknown field 'calibration.num_sample'; did you mean 'calibration.num_samples'?")


def test_misspelled_method_param_suggests_the_field(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, quantization={"method": "gptq", "group_sise": 64})
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: unknown field 'quantization.group_sise'; did you mean 'quantization.group_size'?")


def test_unknown_key_without_close_match_lists_the_fields(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, model={"id": str(model_dir), "flavour": "x"})
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: unknown field 'model.flavour'; expected one of id, revision, dtype, "
        "trust_remote_code, allow_pickle, fingerprint")


def test_misspelled_method(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, quantization={"method": "gtpq"})
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: quantization.method 'gtpq' is unknown; choose one of awq, dynamic_int8, fp8, "
        "gptq, rtn, static_int8 (did you mean 'gptq'?)")


def test_missing_method(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, quantization={"bits": 4})
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: missing required field 'quantization.method'; choose one of awq, dynamic_int8, "
        "fp8, gptq, rtn, static_int8")


def test_wrong_type(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, calibration={"num_samples": "many"})
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: field 'calibration.num_samples': Input should be a valid integer, "
        "unable to parse string as an integer (got 'many')")


def test_section_that_is_not_a_mapping(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, quantization="gptq")
    assert cli_error(capsys, "run", path) == (
        f"error: {path}: field 'quantization': should be a mapping of its own fields (got 'gptq')")


@pytest.mark.parametrize("quantization, fmt, expected", [
    ({"method": "awq", "symmetric": True}, "awq",
     "export.format 'awq' cannot store quantization.method 'awq' as configured: AWQ stores asymmetric "
     "weights only (zero_point: true); use symmetric=false or gptq/compressed-tensors"),
    ({"method": "fp8"}, "awq",
     "export.format 'awq' cannot store quantization.method 'fp8' as configured: AWQ stores weight-only "
     "schemes; activation quantization needs compressed-tensors"),
    ({"method": "fp8"}, "gptq",
     "export.format 'gptq' cannot store quantization.method 'fp8' as configured: GPTQ stores weight-only "
     "schemes; activation quantization needs compressed-tensors"),
    ({"method": "rtn", "bits": 3}, None,
     "export.format 'compressed-tensors' cannot store quantization.method 'rtn' as configured: "
     "weight-only int quantization supports (4, 8) bits, got 3"),
    ({"method": "gptq", "bits": 3}, None, "field 'quantization.bits': Input should be 4 or 8 (got 3)"),
    ({"method": "rtn", "group_size": 0}, None,
     "field 'quantization.group_size': 0 is not a group size; use -1 (one scale per output channel) or a "
     "positive group size such as 32, 64 or 128"),
    ({"method": "rtn"}, "gguf", "export.format 'gguf' is unknown; choose one of awq, compressed-tensors, gptq"),
], ids=["awq-symmetric-as-awq", "fp8-as-awq", "fp8-as-gptq", "rtn-3bit", "gptq-3bit", "group-0", "unknown-format"])
def test_method_format_mismatch_before_any_weight(tmp_path, quantization, fmt, expected, capsys):
    # The model does not exist: the recipe is refused before anything is opened.
    export = {"output_dir": str(tmp_path / "out"), **({"format": fmt} if fmt else {})}
    path = recipe_file(tmp_path, tmp_path / "no-model", quantization=quantization, export=export)
    assert cli_error(capsys, "run", path) == f"error: {path}: {expected}"


def test_trust_remote_code_true_is_refused(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, model={"id": str(model_dir), "trust_remote_code": True})
    assert cli_error(capsys, "validate", path) == (
        f"error: {path}: field 'model.trust_remote_code': quantkit never runs a model's own code, only the "
        "architectures transformers implements; remove it or set false (got True)")
    path = recipe_file(tmp_path, model_dir, model={"id": str(model_dir), "trust_remote_code": False})
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("device, expected", [
    ("cuda", "'cuda' asked for but CUDA is not available; use --device cpu"),
    ("tpu", "'tpu' is not a device; use --device auto, cpu, cuda or cuda:N"),
    ("mps", "'mps' is not supported; use --device auto, cpu, cuda or cuda:N"),
])
def test_eval_device_that_is_not_here(model_dir, monkeypatch, device, expected, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_error(capsys, "eval", model_dir, "--device", device) == f"error: --device: {expected}"
    assert cli_error(capsys, "eval", model_dir, "--tasks", "quantkit_mc", "--base", model_dir,
                     "--device", device) == f"error: --device: {expected}"


@pytest.mark.skipif(importlib.util.find_spec("optimum") is not None, reason="transformers can load the gptq format here")
def test_eval_of_a_format_transformers_cannot_load_here(tmp_path, model_dir, text_file, capsys):
    path = recipe_file(tmp_path, model_dir, **gptq(text_file), export={"output_dir": str(tmp_path / "out"),
                                                                     "format": "gptq"})
    assert main(["--quiet", "run", str(path)]) == 0
    line = cli_error(capsys, "eval", tmp_path / "out")  # the middle is transformers' own words, which name the package
    assert line.startswith(f"error: {tmp_path / 'out'}: transformers cannot load its gptq format here: ")
    assert "optimum" in line and line.endswith("; install what it names, or read the perplexity the run measured "
                                               "in report.json")


def test_eval_refuses_fp4_activations(tmp_path, model_dir, text_file, capsys):
    """transformers' NVFP4 activations are not vLLM's (docs/evaluation.md): no number, one line."""
    sections = gptq(text_file)
    sections["quantization"] = {"method": "rtn", "scheme": "NVFP4"}
    assert main(["--quiet", "run", str(recipe_file(tmp_path, model_dir, **sections))]) == 0
    assert cli_error(capsys, "eval", tmp_path / "out") == (
        f"error: {tmp_path / 'out'}: transformers does not quantize its FP4 activations (NVFP4 W4A4) as vLLM does, "
        "so its scores here would not be the served model's; read the perplexity from the run's report.json "
        "(vLLM's arithmetic); for tasks use --backend vllm")


def test_eval_refuses_asymmetric_experts(tmp_path, text_file, capsys):
    """transformers 5 decompresses a MoE block's experts without their zero points: no number, one line."""
    model = make_tiny_model(tmp_path / "moe", arch="qwen3_moe", layers=1)
    sections = gptq(text_file)
    sections["quantization"]["symmetric"] = False
    assert main(["--quiet", "run", str(recipe_file(tmp_path, model, **sections))]) == 0
    assert "## Load with transformers" not in (tmp_path / "out" / "README.md").read_text()  # there is no way
    assert cli_error(capsys, "eval", tmp_path / "out") == (
        f"error: {tmp_path / 'out'}: transformers 5 reads no zero points for a Mixture-of-Experts block's experts, "
        "so it cannot load this asymmetric checkpoint; read the perplexity from the run's report.json; for tasks "
        "use --backend vllm, which reads them")


def test_recipe_device_without_cuda(tmp_path, model_dir, monkeypatch, capsys):
    """The same check as ``eval --device``, spelling the setting as the recipe writes it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = recipe_file(tmp_path, model_dir, device="cuda:1")
    assert cli_error(capsys, "validate", path) == (
        "error: device: 'cuda:1' asked for but CUDA is not available; use device: cpu")


def test_remote_code_in_model_folder_never_runs(tmp_path, model_dir, capsys):
    """A folder whose config and tokenizer point at their own code (auto_map) still runs the
    built-in classes: the code, which would leave a marker file, is never imported."""
    model = copy_model(model_dir, tmp_path / "custom")
    marker = tmp_path / "remote-code-ran"
    (model / "custom_code.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForCausalLM):\n    pass\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    for name, auto_map in (("config.json", {"AutoConfig": "custom_code.CustomConfig",
                                            "AutoModelForCausalLM": "custom_code.CustomModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "custom_code.CustomTokenizer"]})):
        cfg = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**cfg, "auto_map": auto_map}))
    assert main(["--quiet", "run", str(recipe_file(tmp_path, model, **gptq(write_text_file(tmp_path / "t.jsonl"))))]) == 0
    assert not marker.exists()


# --------------------------------------------------------------------------- the model


def test_missing_model_path(tmp_path, capsys):
    path = recipe_file(tmp_path, tmp_path / "nope")
    assert cli_error(capsys, "run", path) == (
        f"error: model.id: {tmp_path / 'nope'} does not exist; give a local model folder or a hub id (org/name)")


def test_model_path_is_a_file(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir / "config.json")
    assert cli_error(capsys, "run", path) == (
        f"error: model.id: {model_dir / 'config.json'} is a file; give the model's folder (config.json, "
        "*.safetensors, tokenizer) or a hub id (org/name)")


def test_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    path = recipe_file(tmp_path, tmp_path / "empty")
    assert cli_error(capsys, "run", path) == (
        f"error: model.id: {tmp_path / 'empty'} has no config.json; give the folder of a Hugging Face model")


def test_model_folder_without_weights(tmp_path, model_dir, capsys):
    model = copy_model(model_dir, tmp_path / "m", weights=False)
    path = recipe_file(tmp_path, model)
    assert cli_error(capsys, "run", path) == (
        f"error: model.id: {model} has no weights (no *.safetensors, nor *.bin/*.pt to load with "
        "model.allow_pickle: true)")


@pytest.fixture
def pickle_model(tmp_path, model_dir) -> Path:
    model = copy_model(model_dir, tmp_path / "pickled", weights=False)
    torch.save(load_file(str(model_dir / "model.safetensors")), model / "pytorch_model.bin")
    return model


def test_pickle_weights_refused_by_default(tmp_path, pickle_model, capsys):
    path = recipe_file(tmp_path, pickle_model)
    assert cli_error(capsys, "run", path) == (
        f"error: model.id: {pickle_model} has only pickle weights (pytorch_model.bin); pickle can run code "
        "when loaded; convert to safetensors, or set model.allow_pickle: true if you trust it")


def test_pickle_weights_load_when_allowed(tmp_path, model_dir, pickle_model, caplog):
    """Opted in, the .bin model quantizes to exactly what its safetensors twin gives."""
    caplog.set_level(logging.WARNING)
    ref = recipe_file(tmp_path, model_dir, export={"output_dir": str(tmp_path / "ref")})
    assert main(["--quiet", "run", str(ref)]) == 0
    path = recipe_file(tmp_path, model_dir, model={"id": str(pickle_model), "allow_pickle": True})
    assert main(["--quiet", "run", str(path)]) == 0
    assert (f"loading pickle weights {pickle_model / 'pytorch_model.bin'} because model.allow_pickle is true"
            in caplog.messages)
    expected, got = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert expected.keys() == got.keys() and len(got) > 10
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_architecture_transformers_lacks_is_refused(tmp_path, model_dir, capsys):
    model = copy_model(model_dir, tmp_path / "custom")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["MyOwnForCausalLM"]}))
    path = recipe_file(tmp_path, model)
    assert cli_error(capsys, "run", path) == (
        f"error: model {model}: architecture MyOwnForCausalLM is not implemented by the installed transformers; "
        "quantkit runs only models transformers implements (no remote code); upgrade transformers if the "
        "architecture is newer than it")


def test_layer_type_it_cannot_handle_is_refused_before_any_weight(tmp_path, monkeypatch, capsys):
    """A hybrid model whose convolution layers feed a Linear (LFM2): one line naming the
    layer type, its layers and the reason, before a single weight is read."""
    import transformers as tf

    from quantkit.model import ModelSource
    from tests.tiny_models import build_tokenizer

    model = tmp_path / "lfm2"
    tok = build_tokenizer(model)
    cfg = tf.Lfm2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                        layer_types=["conv", "full_attention", "conv"])
    tf.Lfm2ForCausalLM(cfg).save_pretrained(model)
    monkeypatch.setattr(ModelSource, "tensor", lambda *a: pytest.fail("a weight was read"))
    path = recipe_file(tmp_path, model)
    assert cli_error(capsys, "run", path) == (
        f"error: model {model}: model.layers.0 (Lfm2DecoderLayer, layers 0, 2): convolution conv.conv feeds "
        "conv.out_proj (hybrid convolution/state-space layers are not supported); this layer type cannot be "
        "quantized yet")
    assert not (tmp_path / "out").exists()


def test_sequence_longer_than_model_context(tmp_path, model_dir, text_file, capsys):
    path = recipe_file(tmp_path, model_dir, **gptq(text_file, max_seq_length=2048))
    assert cli_error(capsys, "run", path) == (
        "error: recipe: calibration.max_seq_length 2048 exceeds the model's max_position_embeddings (1024)")


def test_output_dir_exists(tmp_path, model_dir, capsys):
    (tmp_path / "out").mkdir()
    path = recipe_file(tmp_path, model_dir)
    assert cli_error(capsys, "run", path) == (
        f"error: export.output_dir {tmp_path / 'out'} exists; choose another folder or set export.overwrite: true")


# --------------------------------------------------------------------------- calibration data


def test_calibration_file_missing(tmp_path, model_dir, capsys):
    path = recipe_file(tmp_path, model_dir, **gptq(tmp_path / "missing.jsonl"))
    assert cli_error(capsys, "run", path) == f"error: calibration.source {tmp_path / 'missing.jsonl'}: file not found"


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.txt", "\n  \n")])
def test_calibration_file_empty(tmp_path, model_dir, name, content, capsys):
    (tmp_path / name).write_text(content)
    path = recipe_file(tmp_path, model_dir, **gptq(tmp_path / name))
    assert cli_error(capsys, "run", path) == f"error: calibration.source {tmp_path / name}: the file is empty"


def test_calibration_wrong_column(tmp_path, model_dir, text_file, capsys):
    sections = gptq(text_file, text_column="content")
    path = recipe_file(tmp_path, model_dir, **sections)
    assert cli_error(capsys, "run", path) == (
        f"error: calibration.source '{text_file}': no column 'content' (columns: text); set calibration.text_column")


def test_calibration_too_short_for_one_sequence(tmp_path, model_dir, capsys):
    (tmp_path / "short.jsonl").write_text('{"text": "hi"}\n')
    path = recipe_file(tmp_path, model_dir, **gptq(tmp_path / "short.jsonl"))
    assert cli_error(capsys, "run", path) == (
        f"error: calibration.source '{tmp_path / 'short.jsonl'}': too little text for one sequence of 64 tokens; "
        "lower calibration.max_seq_length or set calibration.packing: false")


def test_fewer_samples_than_asked_warns_and_continues(tmp_path, model_dir, caplog):
    """Documented behaviour: a WARNING naming what was asked and got, then the run goes on, and
    says so again when the tokens come from the cache."""
    caplog.set_level(logging.WARNING)
    text_file = write_text_file(tmp_path / "few.jsonl", n_docs=4)
    path = recipe_file(tmp_path, model_dir, **gptq(text_file, num_samples=500))
    for run in range(2):
        caplog.clear()
        assert main(["--quiet", "run", "--overwrite", str(path)]) == 0
        got = json.loads((tmp_path / "out" / "report.json").read_text())["calibration"]["num_samples"]
        assert 0 < got < 500
        assert caplog.messages == [f"calibration.source '{text_file}' gave {got} sequences of the 500 asked "
                                   f"for (num_samples); continuing with {got}"], run


# --------------------------------------------------------------------------- numerics and memory


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights(tmp_path, model_dir, bad, capsys):
    model = poisoned(model_dir, tmp_path / "bad", lambda sd: sd["model.layers.0.mlp.up_proj.weight"].__setitem__((5, 3), bad))
    path = recipe_file(tmp_path, model)
    assert cli_error(capsys, "run", path) == (
        f"error: model: tensor model.layers.0.mlp.up_proj.weight in {model / 'model.safetensors'} contains NaN or "
        "Inf; the checkpoint is damaged (re-download or re-convert it)")
    assert not (tmp_path / "out").exists()


def test_activations_overflow(tmp_path, model_dir, text_file, capsys):
    """Finite but huge weights: down_proj's outputs overflow float32 to Inf."""
    def huge(sd):
        sd["model.layers.0.mlp.down_proj.weight"] *= 1e38

    model = poisoned(model_dir, tmp_path / "huge", huge)
    sections = gptq(text_file)
    sections["quantization"] = {"method": "fp8", "activations": "static"}  # calibrated, no Hessian to fail first
    path = recipe_file(tmp_path, model, **sections)
    assert cli_error(capsys, "run", path) == (
        "error: outputs of layer 0 on calibration data contain NaN or Inf (computed in float32); the layer's "
        "weights overflow even in this dtype; check the checkpoint")
    assert not (tmp_path / "out").exists()


def test_out_of_device_memory_gives_advice(tmp_path, model_dir, text_file, monkeypatch, capsys):
    def oom(self, layer, hidden, call):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ModelRunner, "run_layer", oom)
    path = recipe_file(tmp_path, model_dir, **gptq(text_file))
    assert cli_error(capsys, "run", path) == (
        "error: out of device memory; lower calibration.num_samples, calibration.max_seq_length or "
        "calibration.batch_size (activations of all samples stay on the device)")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- secrets


def test_hub_token_never_printed_logged_or_written(tmp_path, model_dir, text_file, monkeypatch, caplog, capsys):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    sections = gptq(text_file)
    sections["evaluate"] = {"source": str(text_file), "num_samples": 2, "max_seq_length": 64}
    path = recipe_file(tmp_path, model_dir, **sections)
    capsys.readouterr()
    assert main(["--debug", "run", str(path)]) == 0
    # A hub id that cannot be reached: the error mentions HF_TOKEN, never its value.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    missing = recipe_file(tmp_path, "nobody/no-such-model")
    assert main(["run", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert "error: model.id: 'nobody/no-such-model' is neither" in err
    assert len(caplog.records) > 5 and "perplexity" in out  # the capture saw the run
    assert FAKE_TOKEN not in out + err + caplog.text
    files = [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
    assert {"report.json", "README.md"} <= {f.name for f in files}
    for f in files:
        assert FAKE_TOKEN.encode() not in f.read_bytes(), f
