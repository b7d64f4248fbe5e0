import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme

from tests.formats_support import fp8, int8_w8a8, make_qw, w4, with_scale_dtype
from quantkit.errors import ExportError
from quantkit.formats import FORMATS, default_format_for
from quantkit.formats.packing import to_signed, unpack_fp4, unpack_int32
from quantkit.presets import PRESETS as QK_PRESETS
from quantkit.presets import preset_scheme
from quantkit.scheme import FP8_DTYPE, ActivationScheme, Scheme, WeightScheme

CT = FORMATS["compressed-tensors"]()
P = "model.layers.0.mlp.up_proj"

SCHEMES = {
    "w4-sym-g32": w4(True, 32),
    "w4-asym-g32": w4(False, 32),
    "w4-asym-channel": w4(False, None),
    "w4-sym-actorder-static": w4(True, 64, actorder="static"),
    "w8-sym-g64": w4(True, 64, bits=8),
    "w8-asym-channel": w4(False, None, bits=8),
    "int8-channel-dyn-token": int8_w8a8("channel", "token", True),
    "int8-tensor-static": int8_w8a8("tensor", "tensor", False),
    "fp8-channel-dyn-token": fp8("channel", "token", True),
    "fp8-tensor-static": fp8("tensor", "tensor", False),
    "fp8-channel-weight-only": fp8("channel", None),
    "fp8-block": QK_PRESETS["FP8_BLOCK"],
    "fp8-block32": preset_scheme("FP8_BLOCK", block_size=32),
    "fp8-block-a16": QK_PRESETS["FP8_BLOCK_A16"],
    "nvfp4a16": QK_PRESETS["NVFP4A16"],
    "nvfp4": QK_PRESETS["NVFP4"],
    "mxfp4a16": QK_PRESETS["MXFP4A16"],
    "w4afp8": QK_PRESETS["W4AFP8"],
    "w4a8": preset_scheme("W4A8", group_size=32),
}
FP4 = ("nvfp4a16", "nvfp4", "mxfp4a16")
DTYPES = [torch.bfloat16, torch.float16]


def local(tensors):
    return {k[len(P) + 1 :]: v for k, v in tensors.items()}


def unpack_ct(sd, scheme, dtype):
    """Our own inverse of the compressed-tensors layout: codes, scale, zero point."""
    ws = scheme.weights
    if "weight_packed" in sd and sd["weight_packed"].dtype == torch.uint8:
        scale = sd["weight_scale"]
        scale = (scale.to(torch.int32) - 127).float().exp2() if scale.dtype == torch.uint8 else scale
        return unpack_fp4(sd["weight_packed"]).to(FP8_DTYPE), scale, None
    if "weight_packed" in sd:
        out_f, in_f = sd["weight_shape"].tolist()
        codes = to_signed(unpack_int32(sd["weight_packed"], ws.num_bits, 1), ws.num_bits)[:, :in_f]
        zp = sd.get("weight_zero_point")
        zp = None if zp is None else to_signed(unpack_int32(zp, ws.num_bits, 0), ws.num_bits)[:out_f]
        return codes, sd["weight_scale"], zp
    return sd["weight"], sd["weight_scale"], None


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_exact(name, seed, dtype):
    scheme = SCHEMES[name]
    assert CT.unsupported_reason(scheme) is None
    qw = make_qw(scheme, seed)
    sd = local(CT.weight_tensors(P, qw, dtype))
    codes, scale, zp = unpack_ct(sd, scheme, dtype)
    if scheme.weights.type == "float":
        assert codes.dtype == FP8_DTYPE
        assert torch.equal(codes.view(torch.uint8), qw.codes.view(torch.uint8))
    else:
        assert torch.equal(codes, qw.codes)
    packed = "weight_packed" in sd or scheme.weights.num_bits < 8
    if name in FP4:
        assert sd["weight_scale"].dtype == (torch.uint8 if name == "mxfp4a16" else FP8_DTYPE)
        assert torch.equal(scale.float(), qw.scale)
        assert ("weight_global_scale" in sd) == (name != "mxfp4a16")
        if name != "mxfp4a16":
            assert torch.equal(sd["weight_global_scale"], qw.global_scale)
    else:
        assert scale.dtype == (dtype if packed else torch.float32)
        assert torch.equal(scale, qw.scale.to(scale.dtype))
    if name == "nvfp4":
        assert torch.equal(sd["input_global_scale"], qw.input_global_scale)
    assert (zp is None) == (qw.zero_point is None)
    if zp is not None:
        assert torch.equal(zp, qw.zero_point)
    act = scheme.input_activations
    if act is not None and not act.dynamic:
        assert sd["input_scale"].dtype == torch.float32 and torch.equal(sd["input_scale"], qw.input_scale)
    else:
        assert "input_scale" not in sd
    assert "weight_g_idx" not in sd


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("seed", [3, 11])
@pytest.mark.parametrize("dtype", DTYPES)
def test_library_decompresses_to_our_dequantized_weight(name, seed, dtype):
    """Oracle: the installed compressed-tensors compressor for the format we declare."""
    scheme = SCHEMES[name]
    qw = make_qw(scheme, seed)
    cfg = CT.quantization_config(scheme, ["lm_head"])
    parsed = QuantizationConfig.model_validate(cfg)
    ct_scheme = parsed.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(cfg["format"])
    sd = local(CT.weight_tensors(P, qw, dtype))
    # compressed-tensors 0.20 leaves NVFP4's input_global_scale out of its names ("local" is
    # dynamic to it), though llm-compressor writes it and vLLM loads it
    extra = {"input_scale", "input_global_scale"} & set(sd)
    assert set(sd) == set(compressor.compression_param_names(ct_scheme)) | extra
    got = compressor.decompress(sd, ct_scheme)["weight"]
    stored_scale_dtype = sd["weight_scale"].dtype
    want = with_scale_dtype(qw, stored_scale_dtype).dequantize(torch.float32)
    torch.testing.assert_close(got.to(torch.float32), want.to(got.dtype).to(torch.float32), rtol=0, atol=0)


PRESETS = {
    "w4-sym-g32": ("W4A16", {"group_size": 32}),
    "w8-asym-channel": None,
    "int8-channel-dyn-token": ("W8A8", {}),
    "fp8-channel-dyn-token": ("FP8_DYNAMIC", {}),
    "fp8-tensor-static": ("FP8", {}),
    "fp8-block": ("FP8_BLOCK", {}),
    "nvfp4a16": ("NVFP4A16", {}),
    "nvfp4": ("NVFP4", {}),
    "mxfp4a16": ("MXFP4A16", {}),
    "w4afp8": ("W4AFP8", {}),
    "w4a8": ("W4A8", {"group_size": 32}),
}


@pytest.mark.parametrize("name", [k for k, v in PRESETS.items() if v])
def test_config_matches_library_presets(name):
    preset, weight_overrides = PRESETS[name]
    want = preset_name_to_scheme(preset, ["Linear"])
    for key, value in weight_overrides.items():
        setattr(want.weights, key, value)
    cfg = CT.quantization_config(SCHEMES[name], ["lm_head"])
    got = QuantizationConfig.model_validate(cfg).config_groups["group_0"]
    # observers only steer calibration in llm-compressor; loaders never read them
    drop = {"observer", "observer_kwargs"}
    assert got.weights.model_dump(exclude=drop) == want.weights.model_dump(exclude=drop)
    acts = [a and a.model_dump(exclude=drop) for a in (got.input_activations, want.input_activations)]
    assert acts[0] == acts[1]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["quantization_status"] == "compressed"
    assert cfg["ignore"] == ["lm_head"]
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]


@pytest.mark.parametrize(
    "name,fmt",
    [("w4-asym-g32", "pack-quantized"), ("int8-tensor-static", "int-quantized"),
     ("fp8-channel-dyn-token", "float-quantized"), ("fp8-channel-weight-only", "naive-quantized"),
     ("fp8-block", "float-quantized"), ("fp8-block-a16", "naive-quantized"), ("nvfp4", "nvfp4-pack-quantized"),
     ("nvfp4a16", "nvfp4-pack-quantized"), ("mxfp4a16", "mxfp4-pack-quantized"), ("w4a8", "int-quantized")],
)
def test_format_names_match_library_inference(name, fmt):
    from compressed_tensors.compressors.format import infer_module_format

    cfg = CT.quantization_config(SCHEMES[name], [])
    assert cfg["format"] == fmt
    ct_scheme = QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])
    assert infer_module_format(torch.nn.Linear, ct_scheme).value == fmt


def test_config_loads_in_transformers():
    from transformers.utils.quantization_config import CompressedTensorsConfig

    kv = ActivationScheme(num_bits=8, type="float", strategy="tensor", dynamic=False)
    cfg = CT.quantization_config(SCHEMES["w4-asym-g32"], ["lm_head"], kv_cache=kv)
    hf = CompressedTensorsConfig.from_dict(cfg)
    q = hf.quantization_config
    assert q.format == "pack-quantized"
    assert q.kv_cache_scheme.type == "float" and q.kv_cache_scheme.num_bits == 8
    assert q.kv_cache_scheme.strategy == "tensor" and not q.kv_cache_scheme.dynamic
    assert q.ignore == ["lm_head"]


def test_actorder_is_described_as_weight_order():
    cfg = CT.quantization_config(SCHEMES["w4-sym-actorder-static"], [])
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    assert "actorder" not in CT.quantization_config(SCHEMES["w4-sym-g32"], [])["config_groups"]["group_0"]["weights"]


def test_permuted_g_idx_is_refused():
    qw = make_qw(w4(True, 32, actorder="static"), 5, permute=True)
    with pytest.raises(ExportError) as e:
        CT.weight_tensors(P, qw, torch.bfloat16)
    assert (e.value.file, e.value.field, e.value.value) == (P, "export.format", "compressed-tensors")
    assert e.value.hint == "export with format 'gptq' or quantize with static act-order groups"


def test_natural_g_idx_is_accepted_and_dropped():
    qw = make_qw(w4(True, 32, actorder="static"), 5)
    qw.g_idx = (torch.arange(128) // 32).to(torch.int32)
    assert "model.layers.0.mlp.up_proj.weight_g_idx" not in CT.weight_tensors(P, qw, torch.bfloat16)


def test_static_scheme_without_input_scale_is_refused():
    qw = make_qw(SCHEMES["int8-tensor-static"], 1)
    qw.input_scale = None
    with pytest.raises(ExportError) as e:
        CT.weight_tensors(P, qw, torch.bfloat16)
    assert e.value.file == P and "input_scale" in e.value.message


@pytest.mark.parametrize(
    "scheme,needle",
    [
        (w4(True, 32, bits=3), "bits"),
        (Scheme(WeightScheme(num_bits=4, strategy="tensor", group_size=None)), "strategy"),
        (Scheme(WeightScheme(num_bits=4, group_size=32, symmetric=False), ActivationScheme()), "symmetric"),
        (Scheme(WeightScheme(num_bits=4, group_size=32), ActivationScheme(strategy="tensor", dynamic=False)),
         "per token"),
        (Scheme(WeightScheme(num_bits=4, group_size=32), ActivationScheme(type="float")), "group_size 128"),
        (Scheme(WeightScheme(num_bits=2, group_size=32), ActivationScheme()), "4-bit"),
        (Scheme(WeightScheme(num_bits=4, type="float", strategy="group", group_size=16)), "NVFP4"),
        (Scheme(WeightScheme(num_bits=8, type="float", strategy="block", group_size=None, block_size=(128, 128)),
                ActivationScheme(type="float", strategy="token")), "block"),
        (Scheme(WeightScheme(num_bits=8, type="float", strategy="group", group_size=32)), "strategy"),
        (Scheme(WeightScheme(num_bits=8, strategy="channel", group_size=None), ActivationScheme(type="float")), "weights"),
        (Scheme(WeightScheme(num_bits=8, strategy="channel", group_size=None), ActivationScheme(dynamic=False)), "dynamic"),
        (Scheme(WeightScheme(num_bits=8, strategy="channel", group_size=None), ActivationScheme(symmetric=False)), "asymmetric"),
    ],
)
def test_invalid_schemes_have_reasons(scheme, needle):
    reason = CT.unsupported_reason(scheme)
    assert isinstance(reason, str) and needle in reason
    with pytest.raises(ExportError) as e:
        CT.quantization_config(scheme, [])
    assert (e.value.field, e.value.value) == ("export.format", "compressed-tensors")
    assert e.value.file == "quantization_config"


def test_kv_cache_reasons():
    assert CT.kv_cache_reason(None) is None
    assert CT.kv_cache_reason(ActivationScheme(type="float", strategy="tensor", dynamic=False)) is None
    assert "FP8" in CT.kv_cache_reason(ActivationScheme(type="int", strategy="tensor", dynamic=False))
    assert "static" in CT.kv_cache_reason(ActivationScheme(type="float", strategy="token", dynamic=True))
    assert "compressed-tensors" in FORMATS["gptq"]().kv_cache_reason(ActivationScheme(type="float"))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_default_format_is_valid_for_supported_schemes(name):
    fmt = FORMATS[default_format_for(SCHEMES[name])]()
    assert fmt.unsupported_reason(SCHEMES[name]) is None


def test_w4afp8_is_written_packed_as_vllm_reads_it():
    """compressed-tensors 0.20 would infer int-quantized for int weights with activations, but
    vLLM's CompressedTensorsW4A8Fp8 loads weight_packed (int32) and weight_shape."""
    from compressed_tensors.compressors.format import infer_module_format

    cfg = CT.quantization_config(SCHEMES["w4afp8"], [])
    group = cfg["config_groups"]["group_0"]
    assert cfg["format"] == group["format"] == "pack-quantized"
    ct_scheme = QuantizationScheme.model_validate(group)
    assert infer_module_format(torch.nn.Linear, ct_scheme).value == "int-quantized"
    sd = local(CT.weight_tensors(P, make_qw(SCHEMES["w4afp8"], 2), torch.bfloat16))
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape"} and sd["weight_packed"].dtype == torch.int32


def _mixed_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_mixed_schemes_write_one_group_each_and_resolve_in_the_library():
    """Most Linears NVFP4, down_proj FP8 block, one layer's MLP left in float: three schemes
    (two groups + ignore) that compressed-tensors' own matcher gives back per module."""
    from compressed_tensors.quantization import apply_quantization_config

    model = _mixed_model()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    nvfp4, block = QK_PRESETS["NVFP4A16"], QK_PRESETS["FP8_BLOCK"]
    schemes = {n: block if n.endswith("down_proj") else nvfp4 for n in linears if ".1.mlp." not in n}
    ignore = ["lm_head"] + [n for n in linears if ".1.mlp." in n]
    cfg = CT.quantization_config(schemes, ignore)
    assert cfg["format"] == "mixed-precision"
    groups = cfg["config_groups"]
    assert list(groups) == ["group_0", "group_1"] and groups["group_1"]["targets"] == ["Linear"]
    assert groups["group_1"]["format"] == "nvfp4-pack-quantized" and groups["group_0"]["format"] == "float-quantized"
    assert groups["group_0"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    apply_quantization_config(model, QuantizationConfig.model_validate(cfg), show_progress=False)
    for name in linears + ["lm_head"]:
        got = getattr(model.get_submodule(name), "quantization_scheme", None)
        want = schemes.get(name)
        if want is None:
            assert got is None, name
        else:
            assert (got.weights.strategy, got.weights.num_bits) == (want.weights.strategy, want.weights.num_bits), name


def test_formats_without_mixed_schemes_refuse_them():
    mixed = {"a.q_proj": w4(True, 32), "a.down_proj": w4(True, 32, bits=8)}
    for name in ("gptq", "awq"):
        fmt = FORMATS[name]()
        assert "compressed-tensors" in fmt.mixed_reason()
        with pytest.raises(ExportError):
            fmt.quantization_config(mixed, [])
    assert CT.mixed_reason() is None
    one = {"a.q_proj": w4(True, 32), "a.down_proj": w4(True, 32)}
    assert FORMATS["gptq"]().quantization_config(one, [])["bits"] == 4
