"""FP8 weights, static activation scales and KV-cache scales."""

from __future__ import annotations

import pytest
import torch

from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.fp8 import FP8Params
from quantkit.scheme import FP8_DTYPE

from .helpers import FakeCalibration, group_inputs, llama_graph, quantize_in_one_pass, tiny_llama_layer

LLAMA = llama_graph()


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_weights_representable_and_accurate(strategy):
    layer, data, cfg = tiny_llama_layer(seed=0)
    q = QUANTIZERS["fp8"](FP8Params(weight_strategy=strategy), cfg)
    assert not q.needs_calibration
    calib = FakeCalibration(layer, data)
    out = q.quantize_layer(layer, LLAMA, calib)
    assert calib.runs == 0 and q.extra_tensors() == {}
    for name, qw in out.items():
        w = layer.get_submodule(name).weight.data.double()
        assert qw.codes.dtype == FP8_DTYPE and qw.zero_point is None and qw.input_scale is None
        c = qw.codes.float()
        assert torch.equal(c.to(FP8_DTYPE).float(), c)
        assert qw.scale.shape == ((w.shape[0], 1) if strategy == "channel" else (1,))
        amax = w.abs().amax(1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
        torch.testing.assert_close(qw.scale.double(), amax / 448, rtol=1e-6, atol=0)
        # E4M3 has 3 mantissa bits: relative error ≤ 2^-4 for normal values; values in the
        # subnormal range (below 2^-6 · scale) carry absolute error ≤ 2^-10 · scale.
        s = qw.scale.double()
        err = (qw.dequantize().double() - w).abs()
        assert (err <= w.abs() * 2**-4 + s * 2**-10 + 1e-12).all()
    a = q.scheme.input_activations
    assert (a.type, a.dynamic, a.strategy) == ("float", True, "token")


def test_fp8_static_and_kv_scales_are_minmax():
    layer, data, cfg = tiny_llama_layer(seed=1, batches=3)
    q = QUANTIZERS["fp8"](FP8Params(activations="static", kv_cache=True), cfg)
    out = quantize_in_one_pass(q, layer, data, LLAMA)
    seen = group_inputs(layer, data, LLAMA)
    for g in LLAMA.groups:
        expect = torch.cat(seen[g.key]).abs().max().item() / 448
        for n in g.linears:
            assert out[n].input_scale.shape == (1,)
            assert out[n].input_scale.item() == pytest.approx(expect, rel=1e-6)
    # The KV cache stores the key after RoPE (and the value as projected): its scales are
    # their amax over calibration, computed here from the float layer by hand.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    keys, values = [], []
    for b, x in zip(data, seen["self_attn.q_proj"]):
        x = x.reshape(b["hidden_states"].shape[0], -1, x.shape[-1])
        k = (x @ attn.k_proj.weight.double().T).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
        cos, sin = (t.double() for t in b["position_embeddings"])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        keys.append(k.abs().max())
        values.append((x @ attn.v_proj.weight.double().T).abs().max())
    extra = q.extra_tensors()
    assert set(extra) == {"self_attn.k_scale", "self_attn.v_scale"}
    for key, want in (("self_attn.k_scale", max(keys)), ("self_attn.v_scale", max(values))):
        assert extra[key].shape == () and extra[key].dtype == torch.float32
        assert extra[key].item() == pytest.approx(want.item() / 448, rel=1e-5)
    assert q.scheme.input_activations.strategy == "tensor" and not q.scheme.input_activations.dynamic
