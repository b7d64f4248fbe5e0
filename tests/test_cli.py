"""The command line: help describes every option, progress bars show ETA, --quiet silences them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from quantkit.cli import build_parser, main
from quantkit.quantizers import QUANTIZERS
from quantkit.recipe import CalibrationSpec, EvaluateSpec, ExportSpec, ModelSpec, PushSpec


def test_run_help_lists_every_recipe_field_and_method(capsys):
    try:
        build_parser().parse_args(["run", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for spec in (ModelSpec, CalibrationSpec, EvaluateSpec, ExportSpec, PushSpec):
        for name in spec.model_fields:
            assert f"  {name} (" in text, name
    for method, cls in QUANTIZERS.items():
        assert f"method: {method}" in text
        for field in cls.Params.model_fields:
            if field != "method":
                assert f"{field}=" in text, (method, field)
    for flag in ("--resume", "--overwrite", "--output-dir", "--quiet"):
        assert flag in text


def test_top_level_help_lists_every_command(capsys):
    try:
        build_parser().parse_args(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for command in ("run", "validate", "eval", "bench", "plan", "push"):
        assert f"    {command} " in text


def _run(tmp_path, tiny_llama, text_file, *flags):
    recipe = {"model": {"id": str(tiny_llama)}, "quantization": {"method": "gptq", "group_size": 64},
              "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 32},
              "evaluate": {"source": str(text_file), "num_samples": 2, "max_seq_length": 32},
              "export": {"output_dir": str(tmp_path / "out"), "overwrite": True}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "quantkit", *flags, "run", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True)


def test_progress_bar_with_eta_and_quiet(tmp_path, tiny_llama, text_file):
    loud = _run(tmp_path, tiny_llama, text_file)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "quantizing layers: 100%" in loud.stderr and "2/2 [" in loud.stderr
    assert "<" in loud.stderr.split("quantizing layers")[1]  # tqdm's elapsed<remaining (ETA)
    assert "perplexity: base" in loud.stdout
    assert "next-token KL from base: mean " in loud.stdout and "top-1 agreement " in loud.stdout
    quiet = _run(tmp_path, tiny_llama, text_file, "--quiet")
    assert quiet.returncode == 0
    assert "quantizing layers" not in quiet.stderr and quiet.stderr.strip() == ""
    assert "perplexity: base" in quiet.stdout


@pytest.mark.parametrize("quantization", [
    # one scheme, asymmetric 4-bit pack-quantized: transformers' compressed modules cannot load its packed zero points
    {"method": "gptq", "group_size": 64, "symmetric": False},
    # two schemes (down_proj at 8 bits): transformers cannot decompress it on load, its compressed modules load it
    {"method": "gptq", "group_size": 64, "overrides": [{"targets": ["re:.*down_proj$"], "bits": 8}]},
], ids=["asymmetric", "two-schemes"])
def test_eval_gives_the_perplexities_the_run_measured(tmp_path, tiny_llama, text_file, quantization, capsys):
    """``quantkit eval`` (a model through transformers) and the run's own evaluation (the
    layerwise engine) score the base model and the checkpoint alike on the same windows, on the
    device asked for."""
    windows = {"source": str(text_file), "num_samples": 2, "max_seq_length": 32}
    recipe = {"model": {"id": str(tiny_llama)}, "quantization": quantization,
              "calibration": {**windows, "num_samples": 4}, "evaluate": windows,
              "export": {"output_dir": str(tmp_path / "out")}, "device": "cpu"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    measured = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]
    # The card tells transformers users how to load a one-scheme checkpoint, and its code does.
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("## Load with transformers" in card) == ("overrides" not in quantization)
    if "overrides" not in quantization:
        scope: dict = {}
        exec(card.split("```python\n")[1].split("```")[0], scope)
        assert scope["model"].model.layers[0].mlp.down_proj.weight.shape == (256, 512)
    for folder, key, rel in ((tiny_llama, "perplexity_base", 1e-5), (tmp_path / "out", "perplexity_quantized", 1e-4)):
        capsys.readouterr()
        assert main(["--quiet", "eval", str(folder), "--source", str(text_file), "--num-samples", "2",
                     "--max-seq-length", "32", "--device", "cpu", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert (got["device"], got["dtype"], got["num_windows"]) == ("cpu", "float32", 2)
        assert got["perplexity"] == pytest.approx(measured[key], rel=rel), key
