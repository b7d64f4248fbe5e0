"""Every family end to end, and every method on every family.

Two checks, chosen so the matrix stays cheap (about a minute on 2 cores):

1. One full pipeline run per family (tiny two-layer model from the family's own
   transformers config class), each family with a different method so every method runs
   end to end somewhere. Then: transformers reloads the output (compressed-tensors,
   decompressed) and its logits match quantkit's fake-quantized model; the engine's base
   perplexity, streamed layer by layer with the arguments the model's own forward gives each
   layer (sliding windows, local/global RoPE, M-RoPE, embedding scaling) and the head through
   its own forward (Gemma's softcap, Cohere's logit scale), equals the perplexity of the
   whole model run by transformers; every source tensor is in the output (a vision tower
   byte for byte) and the card says what stayed unquantized.
2. Every method on every family at the layer level: the method quantizes the family's first
   decoder layer with calibration from the model's own forward. Every unit of the graph comes
   back quantized and exportable by the method's format, and the folds it made (AWQ and
   SmoothQuant, into Gemma's 1 + w norms, Phi-3's row slices, Cohere's shared norm) leave the
   float layer's output unchanged. What a full run adds beyond this (export, reload) does not
   depend on the method, so check 1 covers it once per family.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quantkit.engine import _LayerCalibration, make_batches
from quantkit.formats import FORMATS
from quantkit.graph.runtime import ModelRunner
from quantkit.model import ModelSource
from quantkit.quantizers import QUANTIZERS
from tests.helpers import family_workspace, run_family
from tests.test_export_e2e import read_tensors
from tests.tiny_models import MULTIMODAL_FAMILIES, TEXT_FAMILIES, model_class_for

transformers = pytest.importorskip("transformers")

FAMILIES = TEXT_FAMILIES + MULTIMODAL_FAMILIES
METHODS = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 64},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 64},
    "awq": {"method": "awq", "bits": 4, "group_size": 64, "grid": 4, "max_calib_tokens": 64},
    "dynamic_int8": {"method": "dynamic_int8", "smoothquant_alpha": 0.5},
    "static_int8": {"method": "static_int8", "smoothquant_alpha": 0.5},
    "fp8": {"method": "fp8", "activations": "static", "kv_cache": True},
}
FULL_RUN = {  # family -> the method of its full pipeline run
    "llama": "rtn", "mistral": "gptq", "qwen2": "dynamic_int8", "qwen3": "fp8", "gemma2": "static_int8",
    "gemma3": "awq", "phi3": "awq", "olmo2": "gptq", "cohere": "awq", "gemma3-vl": "gptq", "qwen2.5-vl": "rtn",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return family_workspace(tmp_path_factory, "families")


def load(folder: Path, **kwargs):
    config = transformers.AutoConfig.from_pretrained(folder)
    return model_class_for(config).from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(nll.exp())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(workspace, family):
    root, text, model = workspace
    base = model(family)
    out = root / f"out-{family}"
    report, states = run_family(base, text, out, METHODS[FULL_RUN[family]])

    # The model ran as itself: the streamed base perplexity is transformers' own.
    from quantkit.calibration import TextRequest, load_tokens

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    windows = load_tokens(TextRequest(str(text), 2, 40, True, 0, False, section="evaluate"), tokenizer, base)
    ids = torch.stack(windows)
    reference = load(base)
    assert report["evaluation"]["perplexity_base"] == pytest.approx(perplexity(reference, ids), rel=1e-4)

    # transformers reloads the checkpoint; its logits are the fake-quantized model's.
    runner_prefix = ModelRunner(ModelSource.open(str(base)), torch.device("cpu"), torch.float32).layer_prefix
    fake = {f"{runner_prefix(i)}{k}": v for i, s in states.items() for k, v in s.items()}
    missing = set(fake) - set(reference.state_dict())
    assert not missing, sorted(missing)
    reference.load_state_dict(fake, strict=False)
    loaded = load(out, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    # Nothing dropped: every source tensor is in the output, as itself or as a quantized weight.
    src, dst = read_tensors(base), read_tensors(out)
    config = json.loads((out / "config.json").read_text())
    for name, t in src.items():
        if name in dst:
            if not any(name.startswith(p) for p in ("model.layers.", "language_model.model.layers.",
                                                    "model.language_model.layers.")):
                assert torch.equal(dst[name], t), name  # outside the layers: byte for byte
        else:
            stem = name.removesuffix(".weight")
            assert any(k.startswith(stem + ".weight") for k in dst), f"{name} dropped"
    card = (out / "README.md").read_text()
    assert "## What stayed unquantized" in card and "norm: kept in float" in card
    if family in MULTIMODAL_FAMILIES:
        tower = [k for k in src if "vision_tower" in k or k.startswith("visual")]
        assert tower and all(torch.equal(dst[k], src[k]) for k in tower)
        assert any("vision_tower" in i or "visual" in i for i in config["quantization_config"]["ignore"])
        assert "not part of the language decoder" in card
        # The processors vLLM builds its input processor from travel with the checkpoint.
        processors = [f.name for f in base.iterdir() if f.name.endswith("processor_config.json")]
        assert "preprocessor_config.json" in processors
        assert all((out / n).read_bytes() == (base / n).read_bytes() for n in processors)


@pytest.fixture(scope="module")
def layer_inputs(workspace):
    """Per family: the runner, its first layer's calibration (from the model's own forward)."""
    root, text, model = workspace
    cache = {}

    def get(family: str):
        if family not in cache:
            runner = ModelRunner(ModelSource.open(str(model(family))), torch.device("cpu"), torch.float32)
            ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
            cache[family] = (runner, runner.capture(make_batches(list(ids), 2)))
        return cache[family]

    return get


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_on_every_family(layer_inputs, family, method):
    runner, batches = layer_inputs(family)
    graph = runner.graph.layer(0)
    layer = runner.load_layer(0)
    with torch.no_grad():
        before = [runner.run_layer(layer, b.hidden, b.calls[0]) for b in batches]
    params = QUANTIZERS[method].Params(**METHODS[method])
    quantizer = QUANTIZERS[method](params, {})
    out = quantizer.quantize_layer(layer, graph, _LayerCalibration(runner, 0, layer, batches, seed=0))
    assert set(out) == set(graph.linears)
    with torch.no_grad():  # folds keep the float function
        for b, want in zip(batches, before):
            torch.testing.assert_close(runner.run_layer(layer, b.hidden, b.calls[0]), want, rtol=1e-4, atol=1e-4)
    fmt = FORMATS[QUANTIZERS[method].default_format]()
    for name, qw in out.items():
        assert qw.shape == tuple(graph.unit(name).matrix(layer).shape)
        assert fmt.weight_tensors(name, qw, torch.float32)
        if not params.scheme().weight_only and not params.scheme().input_activations.dynamic:
            assert qw.input_scale is not None and float(qw.input_scale) > 0
    if method == "fp8":
        kv = quantizer.extra_tensors()
        assert sorted(kv) == ["self_attn.k_scale", "self_attn.v_scale"] and all(float(v) > 0 for v in kv.values())
