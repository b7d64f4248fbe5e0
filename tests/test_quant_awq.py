"""AWQ: scale search, clip search, folding, and the layer quantizer."""

from __future__ import annotations

import pytest
import torch

from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.awq import AWQParams, awq_clip_search, awq_scale_search, gram, output_sq_error
from quantkit.quantizers.rtn import quantize_rtn
from quantkit.quantizers.sampling import RowSample

from .helpers import FakeCalibration, correlated_inputs, llama_graph, quantize_in_one_pass, tiny_llama_layer

LLAMA = llama_graph()

SCHEME = AWQParams(group_size=32).scheme()


def _err(x, w, w_hat):
    return torch.linalg.norm(x.double() @ (w.double() - w_hat.double()).T).item()


def test_awq_beats_rtn_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = correlated_inputs(512, 128, g, outliers=4, outlier_gain=50.0)
    ws = [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)]
    s, losses = awq_scale_search(ws, x, x.abs().mean(0), SCHEME, grid=20)
    assert losses.shape == (20,) and losses.argmin().item() > 0
    # Fused check, float64: X Wᵀ against (X/s) Q(W·s)ᵀ, which is how the folded layer runs.
    awq = sum(_err(x, w, quantize_rtn(w * s, SCHEME).dequantize() / s) ** 2 for w in ws) ** 0.5
    rtn = sum(_err(x, w, quantize_rtn(w, SCHEME).dequantize()) ** 2 for w in ws) ** 0.5
    assert awq < 0.8 * rtn, (awq, rtn)
    # The reported loss of ratio 0 is RTN's.
    assert losses[0].item() == pytest.approx(rtn**2, rel=1e-3)


@pytest.mark.parametrize("tokens", [40, 300])
def test_output_error_through_gram_matches_float64(tokens):
    g = torch.Generator().manual_seed(2)
    x = correlated_inputs(tokens, 96, g, outliers=2, outlier_gain=20.0)
    dw = torch.randn(48, 96, generator=g) * 1e-2
    ref = (x.double() @ dw.double().T).pow(2).sum().item()
    assert output_sq_error(x, dw).item() == pytest.approx(ref, rel=1e-5)
    assert output_sq_error(x, dw, gram(x)).item() == pytest.approx(ref, rel=1e-4)


def test_clip_search_never_worse_per_group():
    g = torch.Generator().manual_seed(1)
    x = correlated_inputs(256, 64, g)
    w = torch.randn(16, 64, generator=g)
    w[:, 3] *= 8  # a few large weights make clipping worthwhile
    wc = awq_clip_search(w, x, SCHEME, grid=20)
    assert (wc.abs() <= w.abs() + 1e-7).all()
    assert not torch.equal(wc, w)
    assert _err(x, w, quantize_rtn(wc, SCHEME).dequantize()) < _err(x, w, quantize_rtn(w, SCHEME).dequantize())


def test_row_sample_bounded_and_uniform():
    sample = RowSample(cap=100, generator=torch.Generator().manual_seed(0))
    for i in range(50):
        sample.add(torch.full((20, 2), float(i)))
    rows = sample.rows()
    assert 50 <= rows.shape[0] <= 100 and sample.seen == 1000
    # Uniform over all batches: the mean batch index is near the middle (24.5).
    assert abs(rows[:, 0].mean().item() - 24.5) < 6


def _layer_out_error(layer, ref_outs, data, weights):
    with torch.no_grad():
        for name, qw in weights.items():
            layer.get_submodule(name).weight.copy_(qw.dequantize())
        return sum(torch.linalg.norm(layer(**b).double() - r).item() ** 2 for b, r in zip(data, ref_outs)) ** 0.5


@pytest.mark.parametrize("gqa", [False, True])
def test_awq_layer_folds_exactly_and_beats_rtn(gqa):
    layer, data, cfg = tiny_llama_layer(seed=2, gqa=gqa, batches=4, seq=32, outliers=3)
    with torch.no_grad():
        ref = [layer(**b).double() for b in data]
    rtn_layer, _, _ = tiny_llama_layer(seed=2, gqa=gqa, batches=4, seq=32, outliers=3)
    graph = llama_graph(gqa)
    rtn_w = QUANTIZERS["rtn"](QUANTIZERS["rtn"].Params(group_size=32, symmetric=False), cfg).quantize_layer(
        rtn_layer, graph, FakeCalibration(rtn_layer, data)
    )
    o_before = layer.self_attn.o_proj.weight.clone()
    q = QUANTIZERS["awq"](AWQParams(group_size=32, max_calib_tokens=64), cfg)
    out = quantize_in_one_pass(q, layer, data, graph)
    assert set(out) == set(graph.linears)
    # Folding alone leaves the float layer's function unchanged.
    with torch.no_grad():
        for b, r in zip(data, ref):
            torch.testing.assert_close(layer(**b).double(), r, rtol=1e-4, atol=1e-4)
    # With GQA o_proj's columns of query heads sharing a kv head would need one tied scale
    # (the graph records the tie); AWQ leaves such a group alone, as llm-compressor does.
    assert torch.equal(layer.self_attn.o_proj.weight, o_before) == gqa
    awq_err = _layer_out_error(layer, ref, data, out)
    rtn_err = _layer_out_error(rtn_layer, ref, data, rtn_w)
    assert awq_err < rtn_err, (awq_err, rtn_err)
    qw = out["mlp.down_proj"]
    assert qw.zero_point is not None and qw.scale.shape == (64, 128 // 32)
    assert int(qw.codes.min()) >= -8 and int(qw.codes.max()) <= 7
