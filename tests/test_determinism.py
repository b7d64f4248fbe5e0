"""The same recipe run twice writes byte-identical output folders; only report.json's timing
differs. Between the runs the global RNG is reseeded: a draw from it would show as a difference.

AWQ (its token subsample) and static INT8 (its observer subsample) draw random numbers; the
recipes below are sized so that both really subsample. The other methods draw nothing and run
once each on a one-layer model: cheap, and it catches anything else that varies between runs.
"""

from __future__ import annotations

import json

import pytest
import torch

import quantkit
from quantkit.quantizers import int8_static, sampling
from quantkit.quantizers.observers import TensorObserver
from tests.tiny_models import make_tiny_model

QUANTIZATION = {
    "awq": {"method": "awq", "bits": 4, "group_size": 64, "max_calib_tokens": 64},
    "static_int8": {"method": "static_int8", "observer": "percentile", "percentile": 99.0},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 64},
    "rtn": {"method": "rtn", "bits": 4, "group_size": 64},
    "dynamic_int8": {"method": "dynamic_int8"},
    "fp8": {"method": "fp8", "activations": "static", "kv_cache": True},
}


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("det") / "model", layers=1, hidden=128, intermediate=256)


@pytest.fixture
def draws(monkeypatch):
    """Records every sampler a run makes, with a small observer budget so static INT8 subsamples."""
    made = []

    def observer(*args, **kwargs):
        made.append(TensorObserver(*args, max_samples=2048, **kwargs))
        return made[-1]

    def row_sample(*args, **kwargs):
        made.append(sampling.RowSample(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(int8_static, "TensorObserver", observer)
    monkeypatch.setattr("quantkit.quantizers.awq.RowSample", row_sample)
    return made


def _run_twice(model, text, out, quantization):
    """The same recipe (output folder included) twice; the first result is moved aside."""
    folder, kept = out / "out", out / "first"
    for seed in (1000, 1001):
        torch.manual_seed(seed)
        quantkit.quantize(model=str(model), quantization=quantization, device="cpu", quiet=True,
                          calibration={"source": str(text), "num_samples": 8, "max_seq_length": 64, "batch_size": 4,
                                       "seed": 7},
                          evaluate={"source": str(text), "num_samples": 2, "max_seq_length": 64},
                          export={"output_dir": str(folder)})
        if not kept.exists():
            folder.rename(kept)
    return kept, folder


def _assert_same_folders(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"model.safetensors", "config.json", "README.md", "report.json"} <= set(names)
    for name in names:
        if name == "report.json":
            ra, rb = (json.loads((f / name).read_text()) for f in (a, b))
            ra.pop("timing"), rb.pop("timing")
            assert ra == rb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("method", ["awq", "static_int8"])
def test_sampling_methods_write_identical_folders(method, one_layer, text_file, tmp_path, draws):
    a, b = _run_twice(one_layer, text_file, tmp_path, QUANTIZATION[method])
    subsampled = [d for d in draws if getattr(d, "rate", getattr(d, "_rate", 1.0)) < 1.0]
    assert subsampled, "the recipe must make the sampler draw, or this test proves nothing"
    _assert_same_folders(a, b)


@pytest.mark.parametrize("method", ["gptq", "rtn", "dynamic_int8", "fp8"])
def test_other_methods_write_identical_folders(method, one_layer, text_file, tmp_path):
    _assert_same_folders(*_run_twice(one_layer, text_file, tmp_path, QUANTIZATION[method]))


def test_draws_depend_on_seed_layer_and_group_only():
    """Another calibration.seed, layer or group gives another draw; the global RNG gives none."""
    from quantkit.seeding import generator

    state = torch.get_rng_state()
    a = torch.randperm(100, generator=generator(7, 0, "self_attn.q_proj"))
    assert torch.equal(a, torch.randperm(100, generator=generator(7, 0, "self_attn.q_proj")))
    for other in (generator(8, 0, "self_attn.q_proj"), generator(7, 1, "self_attn.q_proj"),
                  generator(7, 0, "mlp.gate_proj")):
        assert not torch.equal(a, torch.randperm(100, generator=other))
    assert torch.equal(torch.get_rng_state(), state)
