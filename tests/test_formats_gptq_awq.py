import numpy as np
import pytest
import torch

from tests.formats_support import fp8, int8_w8a8, make_qw, w4, with_scale_dtype
from quantkit.errors import ExportError
from quantkit.formats import FORMATS
from quantkit.formats.packing import to_signed, unpack_awq, unpack_int32
from quantkit.scheme import ActivationScheme, Scheme, WeightScheme

GPTQ = FORMATS["gptq"]()
AWQ = FORMATS["awq"]()
P = "model.layers.3.self_attn.o_proj"

GPTQ_SCHEMES = {
    "w4-sym-g32": w4(True, 32),
    "w4-asym-g32": w4(False, 32),
    "w4-sym-channel": w4(True, None),
    "w4-asym-channel": w4(False, None),
    "w8-sym-g64": w4(True, 64, bits=8),
    "w8-asym-g32": w4(False, 32, bits=8),
    "w4-sym-actorder": w4(True, 32, actorder="static"),
    "w8-asym-actorder": w4(False, 64, actorder="static", bits=8),
}


def local(tensors):
    return {k[len(P) + 1 :]: v for k, v in tensors.items()}


def _bits_np(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Split int32 words into unsigned fields, lowest bits first, fields laid out along ``axis``.

    Written from vLLM gptq.py's torch fallback: ``wf = range(0, 32, bits)``, field ``k`` is
    ``(word >> wf[k]) & (2**bits - 1)`` (qweight fields run down the input dim, qzeros fields
    along the output dim).
    """
    u = words.astype(np.int64) & 0xFFFFFFFF
    fields = np.stack([(u >> s) & ((1 << bits) - 1) for s in range(0, 32, bits)], axis=axis + 1)
    shape = list(u.shape)
    shape[axis] *= 32 // bits
    return fields.reshape(shape)


def gptq_oracle_dequant(sd, bits):
    """Dequantized ``[out, in]`` weight per vLLM gptq.py (v1: stored zeros + 1)."""
    q = _bits_np(sd["qweight"].numpy(), bits, 0)  # [in, out]
    z = _bits_np(sd["qzeros"].numpy(), bits, 1) + 1  # [G, out]
    s = sd["scales"].to(torch.float32).numpy()
    g = sd["g_idx"].numpy().astype(np.int64)
    return torch.from_numpy(((q - z[g]) * s[g]).T.astype(np.float32))


def awq_oracle_dequant(sd, group_size):
    """Dequantized ``[out, in]`` weight per vLLM's AWQ readers.

    vLLM cpu_wna16.py (CPUAWQLinearMethod.process_weights_after_loading) unpacks nibbles lowest
    first and reorders each block of eight with ``interleave_map = (0, 4, 1, 5, 2, 6, 3, 7)``;
    zeros are used as stored: ``w = (q - z) * s``.
    """
    interleave = [0, 4, 1, 5, 2, 6, 3, 7]

    def unpack(words):
        f = _bits_np(words.numpy(), 4, 1)
        r, c = f.shape
        return f.reshape(r, c // 8, 8)[:, :, interleave].reshape(r, c)

    q = unpack(sd["qweight"])  # [in, out]
    z = unpack(sd["qzeros"])  # [G, out]
    s = sd["scales"].to(torch.float32).numpy()
    g = np.arange(q.shape[0]) // group_size
    return torch.from_numpy(((q - z[g]) * s[g]).T.astype(np.float32))


@pytest.mark.parametrize("name", list(GPTQ_SCHEMES))
@pytest.mark.parametrize("seed", [0, 5, 9])
def test_gptq_round_trip_and_vllm_oracle(name, seed):
    scheme = GPTQ_SCHEMES[name]
    assert GPTQ.unsupported_reason(scheme) is None
    bits = scheme.weights.num_bits
    qw = make_qw(scheme, seed, out_f=64, in_f=128)
    sd = local(GPTQ.weight_tensors(P, qw, torch.bfloat16))
    n_groups = qw.scale.shape[1]
    assert sd["qweight"].shape == (128 * bits // 32, 64) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (n_groups, 64 * bits // 32) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (n_groups, 64) and sd["scales"].dtype == torch.float16
    assert sd["g_idx"].shape == (128,) and sd["g_idx"].dtype == torch.int32

    codes = to_signed(unpack_int32(sd["qweight"], bits, 0), bits).t()
    assert torch.equal(codes, qw.codes)
    zeros = to_signed(unpack_int32(sd["qzeros"], bits, 1) + 1, bits).t()
    want_zeros = qw.zero_point if qw.zero_point is not None else torch.zeros_like(zeros)
    assert torch.equal(zeros, want_zeros)
    if qw.zero_point is None:  # symmetric v1: every field is 2**(b-1) - 1
        assert bool((unpack_int32(sd["qzeros"], bits, 1) == (1 << (bits - 1)) - 1).all())
    assert torch.equal(sd["scales"], qw.scale.t().to(torch.float16))
    want_g = qw.g_idx if qw.g_idx is not None else torch.arange(128) // (scheme.weights.group_size or 128)
    assert torch.equal(sd["g_idx"], want_g.to(torch.int32))

    want = with_scale_dtype(qw, torch.float16).dequantize()
    assert torch.equal(gptq_oracle_dequant(sd, bits), want)


@pytest.mark.parametrize("seed", [1, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_awq_round_trip_and_vllm_oracle(seed, group):
    scheme = w4(False, group)
    assert AWQ.unsupported_reason(scheme) is None
    qw = make_qw(scheme, seed, out_f=64, in_f=128)
    sd = local(AWQ.weight_tensors(P, qw, torch.bfloat16))
    assert sd["qweight"].shape == (128, 8) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (128 // group, 8) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (128 // group, 64) and sd["scales"].dtype == torch.float16
    assert set(sd) == {"qweight", "qzeros", "scales"}

    assert torch.equal(to_signed(unpack_awq(sd["qweight"]), 4).t(), qw.codes)
    assert torch.equal(to_signed(unpack_awq(sd["qzeros"]), 4).t(), qw.zero_point)
    assert torch.equal(sd["scales"], qw.scale.t().to(torch.float16))

    want = with_scale_dtype(qw, torch.float16).dequantize()
    assert torch.equal(awq_oracle_dequant(sd, group), want)


def test_gptq_v1_refuses_zero_point_at_lowest_code():
    qw = make_qw(w4(False, 32), 2)
    qw.zero_point[0, 0] = -8
    with pytest.raises(ExportError) as e:
        GPTQ.weight_tensors(P, qw, torch.float16)
    assert (e.value.file, e.value.value, e.value.hint) == (P, "gptq", "use compressed-tensors")


def test_gptq_refuses_permuted_g_idx_without_actorder():
    qw = make_qw(w4(True, 32), 2)
    qw.g_idx = make_qw(w4(True, 32, actorder="group"), 2, permute=True).g_idx
    with pytest.raises(ExportError) as e:
        GPTQ.weight_tensors(P, qw, torch.float16)
    assert e.value.file == P and "desc_act" in e.value.message


def test_gptq_configs():
    assert GPTQ.quantization_config(w4(True, 128), ["lm_head"]) == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128,
        "desc_act": False, "sym": True, "lm_head": False,
    }
    cfg = GPTQ.quantization_config(w4(False, None, bits=8), [])
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (8, -1, False, False)
    assert GPTQ.quantization_config(w4(True, 64, actorder="static"), [])["desc_act"] is False
    assert "static_groups: true" in GPTQ.unsupported_reason(w4(True, 64, actorder="group"))


def test_gptq_config_loads_in_transformers():
    from transformers import GPTQConfig

    hf = GPTQConfig.from_dict(GPTQ.quantization_config(w4(False, 64, actorder="static"), []))
    assert (hf.bits, hf.group_size, hf.desc_act, hf.sym, hf.format) == (4, 64, False, False, "gptq")


def test_awq_config_and_transformers():
    from transformers import AwqConfig

    cfg = AWQ.quantization_config(w4(False, 128), ["lm_head", "model.layers.0.mlp.down_proj"])
    assert cfg == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True,
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"],
    }
    hf = AwqConfig.from_dict(cfg)
    assert (hf.bits, hf.group_size, hf.zero_point) == (4, 128, True)


@pytest.mark.parametrize(
    "fmt,scheme,needle",
    [
        (AWQ, w4(True, 128), "asymmetric"),
        (AWQ, w4(False, 128, bits=8), "4-bit"),
        (AWQ, w4(False, None), "group"),
        (AWQ, w4(False, 128, actorder="group"), "act-order"),
        (AWQ, fp8("channel", None), "4-bit"),
        (AWQ, int8_w8a8(), "weight-only"),
        (AWQ, w4(False, 128, bits=3), "4-bit"),
        (GPTQ, fp8("channel", None), "FP8"),
        (GPTQ, fp8("tensor", "tensor", False), "weight-only"),
        (GPTQ, int8_w8a8(), "weight-only"),
        (GPTQ, w4(True, 128, bits=3), "bits"),
        (GPTQ, Scheme(WeightScheme(num_bits=4, strategy="tensor", group_size=None)), "strategy"),
    ],
)
def test_invalid_pairs_have_reasons(fmt, scheme, needle):
    reason = fmt.unsupported_reason(scheme)
    assert isinstance(reason, str) and needle in reason
    with pytest.raises(ExportError) as e:
        fmt.quantization_config(scheme, [])
    assert (e.value.field, e.value.value, e.value.file) == ("export.format", fmt.name, "quantization_config")
    with pytest.raises(ExportError) as e:
        fmt.weight_tensors(P, make_qw(scheme, 0), torch.float16)
    assert (e.value.field, e.value.value, e.value.file) == ("export.format", fmt.name, P)


@pytest.mark.parametrize("fmt", [AWQ, GPTQ])
def test_kv_cache_is_refused_by_awq_and_gptq(fmt):
    kv = ActivationScheme(type="float", strategy="tensor", dynamic=False)
    assert "compressed-tensors" in fmt.kv_cache_reason(kv)
    with pytest.raises(ExportError) as e:
        fmt.quantization_config(w4(False, 128), [], kv_cache=kv)
    assert (e.value.field, e.value.value) == ("export.format", fmt.name)
