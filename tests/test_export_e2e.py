"""End to end: every valid quantizer x format pair, run through the real pipeline on tiny
Llama/Qwen2/Mistral models, is read back by an independent loader and computes what
quantkit's own fake-quantized model computes.

The reference is the engine's layer right after quantization (``on_layer``: fake-quantized
weights, folded norms) put into the float base model. The checkpoint side is:
  - compressed-tensors: transformers' own loader, decompressed (``run_compressed=False``), so
    every Linear holds the dequantized weight and no activation is quantized at run time
    (compressed-tensors would otherwise fake-quantize W8A8/FP8 inputs, which the reference
    does not do);
  - gptq / awq: transformers needs optimum + gptqmodel (not installable here), so the test
    decodes the tensors itself, written from vLLM's definitions (GPTQ v1 zeros stored minus one,
    AWQ's reverse order ``(0, 4, 1, 5, 2, 6, 3, 7)``), not from quantkit's packing module, and
    loads the result as a plain transformers model.
Tolerances: compressed-tensors weights must match exactly where the scale is stored in the
model dtype (float32 here) and logits to 1e-4; GPTQ/AWQ store float16 scales (relative error
<= 2**-11 per weight), so weights match to that and logits to 5e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantkit.activations import attach_activation_quantizers
from quantkit.pipeline import run
from quantkit.recipe import make_recipe
from tests.tiny_models import make_tiny_model, write_text_file

transformers = pytest.importorskip("transformers")

MODELS = {  # name -> (arch, tied)
    "llama": ("llama", False),
    "llama-tied": ("llama", True),
    "qwen2-tied": ("qwen2", True),
    "mistral": ("mistral", False),
}

CASES = [  # id, model, format, quantization
    ("rtn-sym-g64-ct", "llama", "compressed-tensors", {"method": "rtn", "bits": 4, "group_size": 64}),
    ("rtn-asym-channel-ct", "qwen2-tied", "compressed-tensors",
     {"method": "rtn", "bits": 4, "group_size": -1, "symmetric": False}),
    ("gptq-sym-g64-actorder-static-ct", "mistral", "compressed-tensors",
     {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True, "static_groups": True}),
    ("gptq-asym-g32-w8-ct", "llama-tied", "compressed-tensors",
     {"method": "gptq", "bits": 8, "group_size": 32, "symmetric": False}),
    ("gptq-sym-g32-actorder-gptq", "qwen2-tied", "gptq",
     {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": True}),
    ("gptq-asym-g64-gptq", "llama", "gptq", {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False}),
    ("gptq-sym-channel-gptq", "mistral", "gptq", {"method": "gptq", "bits": 4, "group_size": -1, "act_order": False}),
    ("awq-g64-awq", "llama", "awq", {"method": "awq", "bits": 4, "group_size": 64, "grid": 8}),
    ("awq-g32-ct", "qwen2-tied", "compressed-tensors",
     {"method": "awq", "bits": 4, "group_size": 32, "grid": 8}),
    ("int8-dynamic-gptq-ct", "llama-tied", "compressed-tensors",
     {"method": "dynamic_int8", "weight_method": "gptq"}),
    ("int8-static-smoothquant-ct", "mistral", "compressed-tensors",
     {"method": "static_int8", "smoothquant_alpha": 0.5}),
    ("fp8-dynamic-ct", "qwen2-tied", "compressed-tensors", {"method": "fp8"}),
    ("fp8-static-kv-ct", "llama", "compressed-tensors",
     {"method": "fp8", "weight_strategy": "tensor", "activations": "static", "kv_cache": True}),
    ("rtn-nvfp4a16-ct", "llama", "compressed-tensors", {"method": "rtn", "scheme": "NVFP4A16"}),
    ("gptq-nvfp4-w4a4-ct", "qwen2-tied", "compressed-tensors", {"method": "gptq", "scheme": "NVFP4"}),
    ("gptq-mxfp4a16-ct", "mistral", "compressed-tensors", {"method": "gptq", "scheme": "MXFP4A16"}),
    ("gptq-fp8-block64-ct", "llama-tied", "compressed-tensors",
     {"method": "gptq", "scheme": "FP8_BLOCK", "block_structure": [64, 64]}),
    ("rtn-w4afp8-ct", "llama", "compressed-tensors", {"method": "rtn", "scheme": "W4AFP8"}),
    ("gptq-w4a8-g64-ct", "qwen2-tied", "compressed-tensors", {"method": "gptq", "scheme": "W4A8", "group_size": 64}),
    # mixed: down_proj at 8 bits, the rest at 4, layer 1's gate/up left in float
    ("mixed-gptq-w4-down8-ignore-ct", "llama", "compressed-tensors",
     {"method": "gptq", "bits": 4, "group_size": 64, "overrides": [{"targets": ["re:.*down_proj$"], "bits": 8}],
      "ignore": ["re:model\\.layers\\.1\\.mlp\\.(gate|up)_proj$"]}),
    # mixed: NVFP4 W4A4, attention FP8; compressed-tensors quantizes both kinds of activations
    ("mixed-rtn-nvfp4-attn-fp8-ct", "mistral", "compressed-tensors",
     {"method": "rtn", "scheme": "NVFP4",
      "overrides": [{"targets": ["re:.*self_attn\\.[qkv]_proj$"], "scheme": "FP8_DYNAMIC"}]}),
]


def bf16_decompressed(scheme) -> bool:
    """NVFP4: compressed-tensors 0.20 unpacks FP4 codes to bf16 and rounds ``q * s / g`` to
    bf16, so the loaded weight is the fake-quantized one rounded to bf16."""
    return scheme.weights.has_global_scale

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    calib = write_text_file(root / "calib.jsonl")
    made: dict[str, Path] = {}

    def model(name: str) -> Path:
        if name not in made:
            arch, tied = MODELS[name]
            made[name] = make_tiny_model(root / name, arch=arch, tied=tied, layers=2, hidden=128,
                                         intermediate=256, heads=4, kv_heads=2, seed=len(made))
        return made[name]

    return root, calib, model


def quantize(model_dir: Path, out: Path, calib: Path, fmt: str, quant: dict, **sections) -> tuple[dict, dict]:
    """Run the pipeline; return the report and the engine's fake-quantized layer states."""
    layers: dict[int, dict[str, torch.Tensor]] = {}

    def keep(i, layer, qweights):
        layers[i] = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        QUANTIZED[i] = dict(qweights)
        for name, qw in qweights.items():  # what the checkpoint's loader will hold
            if bf16_decompressed(qw.scheme):
                layers[i][f"{name}.weight"] = layers[i][f"{name}.weight"].to(torch.bfloat16).float()

    data = {
        "model": {"id": str(model_dir)},
        "quantization": quant,
        "calibration": {"source": str(calib), "num_samples": 4, "max_seq_length": 64, "batch_size": 4},
        "evaluate": {"enabled": False},
        "export": {"output_dir": str(out), "format": fmt},
        "device": "cpu",
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    report = run(make_recipe(data), quiet=True, on_layer=keep)
    return report, layers


QUANTIZED: dict[int, dict] = {}
"""The last run's QuantizedWeights per layer (their schemes and activation parameters)."""


def reference_model(model_dir: Path, layers: dict):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = {f"model.layers.{i}.{k}": v for i, s in layers.items() for k, v in s.items()}
    unknown = set(state) - set(model.state_dict())
    assert not unknown, f"engine layer tensors the model does not have: {sorted(unknown)}"
    model.load_state_dict(state, strict=False)
    return model


def read_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    return tensors


# Independent decoders, from vLLM's reading of each format (not quantkit.formats.packing).
def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes along ``dim``, the k-th code at bits k*bits."""
    pf = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(w >> (bits * k)) & ((1 << bits) - 1) for k in range(pf)], dim=dim + 1)
    shape = list(words.shape)
    shape[dim] *= pf
    return codes.reshape(shape)


def decode_gptq(t: dict, prefix: str, bits: int) -> torch.Tensor:
    q = _unpack(t[f"{prefix}.qweight"], bits, 0).float()  # [in, out]
    z = _unpack(t[f"{prefix}.qzeros"], bits, 1).float() + 1  # v1: stored minus one
    s = t[f"{prefix}.scales"].float()
    g = t[f"{prefix}.g_idx"].long()
    return ((q - z[g]) * s[g]).t()


def decode_awq(t: dict, prefix: str, group: int) -> torch.Tensor:
    def unpack_awq(words):
        v = _unpack(words, 4, 1)
        v = v.reshape(v.shape[0], -1, 8)[:, :, [0, 4, 1, 5, 2, 6, 3, 7]]
        return v.reshape(v.shape[0], -1).float()

    q = unpack_awq(t[f"{prefix}.qweight"])  # [in, out]
    z = unpack_awq(t[f"{prefix}.qzeros"]).repeat_interleave(group, 0)
    s = t[f"{prefix}.scales"].float().repeat_interleave(group, 0)
    return ((q - z) * s).t()


def load_checkpoint(out: Path, fmt: str, config: dict, mixed: bool = False):
    if fmt == "compressed-tensors" and mixed:
        # compressed modules, each decompressed with its own config group (compressed-tensors
        # decompresses FP4 into bf16 whatever the model dtype: back to float32 after)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        model.hf_quantizer.compressor.decompress_model(model)
        for p in model.parameters():
            p.data = p.data.float()
        return model
    if fmt == "compressed-tensors":
        qcfg = transformers.CompressedTensorsConfig(run_compressed=False)
        return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 quantization_config=qcfg).eval()
    t = read_tensors(out)
    qc = config["quantization_config"]
    state = {}
    for name, v in t.items():
        module, leaf = name.rsplit(".", 1)
        if leaf in ("qweight",):
            state[module + ".weight"] = (decode_gptq(t, module, qc["bits"]) if fmt == "gptq"
                                         else decode_awq(t, module, qc["group_size"]))
        elif leaf not in ("qzeros", "scales", "g_idx"):
            state[name] = v
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**plain),
                                                          dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or config["tie_word_embeddings"]), missing
    model.tie_weights()
    return model.eval()


def check_unquantized_ends(out: Path, fmt: str, config: dict) -> None:
    """Embeddings and lm_head stay float, in the model dtype, and are declared unquantized."""
    t = read_tensors(out)
    assert t["model.embed_tokens.weight"].dtype == torch.float32
    head = [k for k in t if k.startswith("lm_head.")]
    if config["tie_word_embeddings"]:
        assert head == []
    else:
        assert head == ["lm_head.weight"] and t["lm_head.weight"].dtype == torch.float32
    assert not [k for k in t if k.startswith("model.embed_tokens.") and not k.endswith(".weight")]
    qc = config["quantization_config"]
    if fmt == "compressed-tensors":
        assert "lm_head" in qc["ignore"]
    elif fmt == "awq":
        assert "lm_head" in qc["modules_to_not_convert"]
    else:
        assert qc["lm_head"] is False


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case_id,model_name,fmt,quant", CASES, ids=[c[0] for c in CASES])
def test_checkpoint_matches_fake_quantized_model(workspace, case_id, model_name, fmt, quant):
    root, calib, model = workspace
    model_dir = model(model_name)
    out = root / f"out-{case_id}"
    report, layers = quantize(model_dir, out, calib, fmt, quant)
    assert sorted(layers) == [0, 1]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == fmt
    check_unquantized_ends(out, fmt, config)

    ref = reference_model(model_dir, layers)
    mixed = bool(set(quant) & {"overrides", "ignore", "targets"})
    loaded = load_checkpoint(out, fmt, config, mixed)
    exact = fmt == "compressed-tensors"
    for i in range(2):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}.weight"
            want = ref.get_parameter(name).detach()
            got = loaded.get_parameter(name).detach().float()
            # float16 scales of GPTQ/AWQ: relative error <= 2**-11 of each weight
            torch.testing.assert_close(got, want, rtol=0 if exact else 2**-10, atol=1e-7 if exact else 1e-6,
                                       msg=lambda m: f"{name}: {m}")
    ref_state, got_state = ref.state_dict(), loaded.state_dict()
    for name in ref_state:  # norms (folded by AWQ/SmoothQuant), biases, embeddings, head
        if name.endswith("proj.weight") or name not in got_state:
            continue
        torch.testing.assert_close(got_state[name].float(), ref_state[name], rtol=0, atol=0,
                                   msg=lambda m: f"{name}: {m}")
    if quant.get("kv_cache"):
        t = read_tensors(out)
        for i in range(2):
            for kv in ("k_scale", "v_scale"):
                s = t[f"model.layers.{i}.self_attn.{kv}"]
                assert s.dtype == torch.float32 and s.numel() == 1 and float(s) > 0
        assert config["quantization_config"]["kv_cache_scheme"]["num_bits"] == 8

    if mixed:  # compressed-tensors now quantizes activations at run time, as quantkit simulates them
        for i, qweights in QUANTIZED.items():
            attach_activation_quantizers(ref.model.layers[i], qweights)
    ids = torch.randint(3, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = loaded(ids).logits.float()
    assert want.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 if exact else 5e-3)


def test_output_folder_contents(workspace):
    """What a published folder holds: shards + index, config, generation config, tokenizer,
    report, and a model card with Hub metadata, the evaluation table and a serve line."""
    import yaml

    import quantkit

    root, calib, model = workspace
    base = model("llama")
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# tiny base\n")
    out = root / "out-folder"
    report = quantkit.quantize(
        model=str(base), quiet=True,
        quantization={"method": "gptq", "bits": 4, "group_size": 64},
        calibration={"source": str(calib), "num_samples": 4, "max_seq_length": 64},
        evaluate={"source": str(calib), "num_samples": 2, "max_seq_length": 64},
        export={"output_dir": str(out), "max_shard_size": "200KB"},
        device="cpu",
    )
    assert not list(root.glob(".out-folder.quantkit-*")), "work folder left behind"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert {s.name for s in shards} == set(index["weight_map"].values())
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    seen, total = {}, 0
    for s in shards:
        with safe_open(s, "pt") as st:
            sizes = [st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys()]
            seen.update({k: s.name for k in st.keys()})
        total += sum(sizes)
        assert sum(sizes) <= 200_000 or len(sizes) == 1, f"{s.name}: {sum(sizes)} bytes in {len(sizes)} tensors"
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total
    assert "model.layers.1.mlp.down_proj.weight_packed" in seen and "lm_head.weight" in seen

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((base / "generation_config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(out)("to be").input_ids

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    ev = on_disk["evaluation"]
    assert ev["perplexity_base"] > 1 and ev["perplexity_quantized"] > 1

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == str(base)
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"quantkit", "gptq", "compressed-tensors"} <= set(meta["tags"])
    assert f"| base | {ev['perplexity_base']:.3f} |" in card
    assert f"| quantized | {ev['perplexity_quantized']:.3f} |" in card
    serve = [ln for ln in card.splitlines() if ln.startswith("vllm serve ")]
    assert serve and str(out) in serve[0] and serve[0] == on_disk["serve_command"].splitlines()[0]
