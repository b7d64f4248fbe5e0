"""SmoothQuant folding, activation observers, and the int8 W8A8 quantizers."""

from __future__ import annotations

import pytest
import torch

from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.int8_dynamic import DynamicInt8Params
from quantkit.quantizers.int8_static import StaticInt8Params
from quantkit.quantizers.observers import TensorObserver, int_scale, minmax_amax, mse_amax, percentile_amax
from quantkit.quantizers.rtn import quantize_rtn
from quantkit.quantizers.smoothquant import smooth_layer, smoothing_scales

from .helpers import FakeCalibration, llama_graph, tiny_llama_layer

LLAMA = llama_graph()


def _group_inputs(layer, data):
    """Every calibration input of each group's first Linear, concatenated (float64)."""
    seen: dict[str, list] = {}
    FakeCalibration(layer, data).run(
        {g.linears[0]: (lambda x, n=g.linears[0]: seen.setdefault(n, []).append(x.double())) for g in LLAMA.groups}
    )
    return {n: torch.cat(v) for n, v in seen.items()}


def test_smoothing_scales_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, generator=g) * 10
    ws = [torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)]
    alpha = 0.7
    w_amax = torch.maximum(ws[0].double().abs().amax(0), ws[1].double().abs().amax(0))
    ref = a.double() ** alpha / w_amax ** (1 - alpha)
    torch.testing.assert_close(smoothing_scales(a, ws, alpha).double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("gqa", [False, True])
def test_smoothquant_preserves_float_layer_output(gqa):
    layer, data, config = tiny_llama_layer(seed=1, gqa=gqa, outliers=3)
    with torch.no_grad():
        # Outlier channels in down_proj's input too (up_proj rows 0..2 scaled up).
        layer.mlp.up_proj.weight[:3] *= 30.0
        before = [layer(**b).double() for b in data]
        inputs_before = _group_inputs(layer, data)
        params_before = {n: p.clone() for n, p in layer.named_parameters()}
        smooth_layer(layer, llama_graph(gqa), FakeCalibration(layer, data), alpha=0.5)
        after = [layer(**b).double() for b in data]
    changed = {n for n, p in layer.named_parameters() if not torch.equal(p, params_before[n])}
    # Every exact fold happens (v_proj → o_proj only without GQA), and nothing else changes.
    expected = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight",
                "mlp.gate_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight",
                "self_attn.k_proj.weight", "self_attn.v_proj.weight"}
    if not gqa:
        expected |= {"self_attn.o_proj.weight"}
    assert changed == expected
    for x, y in zip(before, after):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    # The outlier channels are flattened: the max/median channel range shrinks.
    inputs_after = _group_inputs(layer, data)
    spread = lambda a: (a.abs().amax(0).max() / a.abs().amax(0).median()).item()  # noqa: E731
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        assert spread(inputs_after[name]) < 0.5 * spread(inputs_before[name]), name


def test_observers_statistics():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, 16, generator=g) * (i + 1) for i in range(4)]
    allx = torch.cat(xs).double()
    mm = TensorObserver("minmax", generator=torch.Generator())
    pc = TensorObserver("percentile", percentile=99.0, generator=torch.Generator())
    for x in xs:
        mm.add(x)
        pc.add(x)
    assert mm.amax().item() == allx.abs().max().item()
    assert pc.amax().item() == pytest.approx(percentile_amax(allx, 99.0).item())
    sorted_abs = allx.abs().flatten().sort().values
    assert percentile_amax(allx, 99.0).item() == sorted_abs[int(0.99 * sorted_abs.numel()) - 1].item()
    # MSE picks a clip no wider than max|x| and never worse than minmax.
    x = torch.cat([torch.randn(5000, generator=g), torch.tensor([60.0])])

    def err(amax):
        s = amax / 127
        return ((torch.round(x / s).clamp(-128, 127) * s - x) ** 2).sum().item()

    m = mse_amax(x, 8)
    assert m.item() <= minmax_amax(x).item() and err(m) < err(minmax_amax(x))
    assert int_scale(torch.tensor(127.0)).tolist() == [1.0]


def test_observer_subsample_is_bounded():
    g = torch.Generator().manual_seed(3)
    obs = TensorObserver("percentile", percentile=99.0, max_samples=4000, generator=torch.Generator().manual_seed(0))
    xs = [torch.randn(100, 40, generator=g) for _ in range(10)]
    for x in xs:
        obs.add(x)
    assert obs.samples().numel() <= 4000
    exact = percentile_amax(torch.cat(xs), 99.0).item()
    assert obs.amax().item() == pytest.approx(exact, rel=0.1)


@pytest.mark.parametrize("alpha", [None, 0.5])
@pytest.mark.parametrize("weight_method", ["rtn", "gptq"])
def test_static_int8_scales_are_observer_statistics(alpha, weight_method):
    layer, data, cfg = tiny_llama_layer(seed=4, outliers=2)
    params = StaticInt8Params(smoothquant_alpha=alpha, weight_method=weight_method)
    q = QUANTIZERS["static_int8"](params, cfg)
    assert q.needs_calibration and q.default_format == "compressed-tensors"
    calib = FakeCalibration(layer, data)
    out = q.quantize_layer(layer, LLAMA, calib)
    assert calib.runs == (2 if alpha is not None else 1)
    # The layer is smoothed in place, so a fresh pass sees the inputs the observers saw.
    inputs = _group_inputs(layer, data)
    for grp in LLAMA.groups:
        expect = inputs[grp.linears[0]].abs().max() / 127
        for n in grp.linears:
            qw = out[n]
            assert qw.input_scale.shape == (1,) and qw.input_scale.dtype == torch.float32
            assert qw.input_scale.item() == pytest.approx(expect.item(), rel=1e-6)
            assert qw.scale.shape == (layer.get_submodule(n).weight.shape[0], 1)
            assert qw.codes.dtype == torch.int8 and qw.zero_point is None
            assert not qw.scheme.input_activations.dynamic
            assert qw.scheme.input_activations.strategy == "tensor"


def test_static_int8_percentile_observer():
    layer, data, cfg = tiny_llama_layer(seed=5)
    q = QUANTIZERS["static_int8"](StaticInt8Params(observer="percentile", percentile=99.0), cfg)
    out = q.quantize_layer(layer, LLAMA, FakeCalibration(layer, data))
    x = _group_inputs(layer, data)["mlp.down_proj"]
    assert out["mlp.down_proj"].input_scale.item() == pytest.approx(percentile_amax(x, 99.0).item() / 127, rel=1e-5)


def test_dynamic_int8():
    layer, data, cfg = tiny_llama_layer(seed=6)
    q = QUANTIZERS["dynamic_int8"](DynamicInt8Params(), cfg)
    assert not q.needs_calibration
    calib = FakeCalibration(layer, data)
    out = q.quantize_layer(layer, LLAMA, calib)
    assert calib.runs == 0
    for n, qw in out.items():
        ref = quantize_rtn(layer.get_submodule(n).weight.data, q.scheme)
        assert torch.equal(qw.codes, ref.codes) and qw.input_scale is None
        # RTN round trip: every element within half a step of its channel scale (the
        # symmetric grid puts max|w| exactly half a step past code 127; 1e-4 covers float32).
        err = (qw.dequantize() - layer.get_submodule(n).weight.data).abs()
        assert (err <= qw.scale / 2 * (1 + 1e-4)).all()
    a = q.scheme.input_activations
    assert (a.num_bits, a.type, a.dynamic, a.strategy, a.symmetric) == (8, "int", True, "token", True)

    gq = QUANTIZERS["dynamic_int8"](DynamicInt8Params(weight_method="gptq", smoothquant_alpha=0.8), cfg)
    assert gq.needs_calibration
    calib = FakeCalibration(layer, data)
    out = gq.quantize_layer(layer, LLAMA, calib)
    assert calib.runs == 2 and set(out) == set(LLAMA.linears)
    assert all(torch.isfinite(qw.dequantize()).all() for qw in out.values())


def test_params_reject_bad_values():
    with pytest.raises(Exception):
        StaticInt8Params(observer="median")
    with pytest.raises(Exception):
        DynamicInt8Params(smoothquant_alpha=1.5)
