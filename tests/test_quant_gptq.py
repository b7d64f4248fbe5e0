"""GPTQ against a float64 re-implementation of the reference, and against RTN."""

from __future__ import annotations

import logging

import pytest
import torch

from quantkit.errors import NumericsError
from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.gptq import GPTQParams, gptq_quantize
from quantkit.quantizers.hessian import HessianAccumulator
from quantkit.quantizers.rtn import quantize_rtn, weight_qparams
from quantkit.scheme import Scheme, WeightScheme

from .helpers import FakeCalibration, correlated_inputs, llama_graph, tiny_llama_layer

LLAMA = llama_graph()


def _scheme(bits=4, sym=True, group=128):
    if group == -1:
        return Scheme(WeightScheme(num_bits=bits, symmetric=sym, strategy="channel", group_size=None))
    return Scheme(WeightScheme(num_bits=bits, symmetric=sym, strategy="group", group_size=group))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T.double() @ x.double()


def _ref_params(rows: torch.Tensor, ws: WeightScheme):
    """Float64 scale/zero per row, written from the reference's Quantizer.find_params."""
    qmin, qmax = ws.qmin, ws.qmax
    if ws.symmetric:
        amax = rows.abs().amax(1, keepdim=True)
        return (amax / ((qmax - qmin) / 2)).clamp_min(1e-12), torch.zeros_like(amax)
    lo = rows.amin(1, keepdim=True).clamp_max(0)
    hi = rows.amax(1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def ref_gptq(w, h, ws, group, act_order=False, static_groups=False, damp=0.01):
    """Column-at-a-time GPTQ in float64 (no lazy blocks: mathematically the same updates)."""
    W, H = w.double().clone(), h.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    col_s = col_z = None
    if group == -1 or static_groups:
        g = n if group == -1 else group
        pairs = [_ref_params(W[:, i : i + g], ws) for i in range(0, n, g)]
        col_s = torch.cat([p[0].expand(-1, g) for p in pairs], 1)
        col_z = torch.cat([p[1].expand(-1, g) for p in pairs], 1)
    perm = torch.arange(n)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if col_s is not None:
            col_s, col_z = col_s[:, perm], col_z[:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros_like(W)
    for j in range(n):
        if col_s is None:
            if j % group == 0:
                s, z = _ref_params(W[:, j : j + group], ws)
        else:
            s, z = col_s[:, j : j + 1], col_z[:, j : j + 1]
        q = torch.clamp(torch.round(W[:, j : j + 1] / s) + z, ws.qmin, ws.qmax)
        codes[:, j] = q[:, 0]
        err = (W[:, j] - ((q - z) * s)[:, 0]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return codes[:, torch.argsort(perm)]


def _out_err(w, w_hat, x):
    return torch.linalg.norm(x.double() @ (w.double() - w_hat.double()).T).item()


CASES = [
    dict(bits=4, sym=True, group=16, act_order=False, static_groups=False),
    dict(bits=4, sym=False, group=16, act_order=True, static_groups=False),
    dict(bits=4, sym=True, group=16, act_order=True, static_groups=True),
    dict(bits=8, sym=False, group=-1, act_order=True, static_groups=False),
    dict(bits=4, sym=True, group=-1, act_order=False, static_groups=False),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = correlated_inputs(256, 64, g)
    h = _hessian(x)
    ws = _scheme(case["bits"], case["sym"], case["group"]).weights
    # block_size 32 with group 16: the lazy block updates are exercised across blocks.
    qw = gptq_quantize(
        w, h.float(), Scheme(ws), block_size=32, act_order=case["act_order"], static_groups=case["static_groups"]
    )
    ref = ref_gptq(w, h, ws, case["group"], case["act_order"], case["static_groups"])
    same = (qw.codes.double() == ref).double().mean().item()
    # float32 vs float64 may flip a code sitting on a rounding boundary (and its error then
    # propagates); anything beyond a handful means a different algorithm.
    assert same >= 0.97, same
    ref_qw = qw.__class__(ref.to(torch.int8), qw.scale, qw.zero_point, qw.scheme, qw.g_idx)
    assert _out_err(w, qw.dequantize(), x) <= 1.05 * _out_err(w, ref_qw.dequantize(), x)


RTN_CASES = [
    dict(bits=4, sym=True, group=128),
    dict(bits=4, sym=False, group=64),
    dict(bits=4, sym=True, group=32, act_order=True),
    dict(bits=4, sym=False, group=32, act_order=True, static_groups=True),
    dict(bits=8, sym=True, group=-1),
    dict(bits=4, sym=True, group=-1, act_order=True),
]


@pytest.mark.parametrize("case", RTN_CASES)
def test_beats_rtn_on_correlated_inputs(case):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    x = correlated_inputs(1024, 256, g)
    scheme = _scheme(case["bits"], case["sym"], case["group"])
    qw = gptq_quantize(
        w, _hessian(x).float(), scheme,
        act_order=case.get("act_order", False), static_groups=case.get("static_groups", False),
    )
    rtn = quantize_rtn(w, scheme)
    assert qw.codes.dtype == torch.int8
    assert int(qw.codes.min()) >= scheme.weights.qmin and int(qw.codes.max()) <= scheme.weights.qmax
    assert _out_err(w, qw.dequantize(), x) < 0.9 * _out_err(w, rtn.dequantize(), x)


def test_act_order_g_idx_and_static_groups():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    x = correlated_inputs(512, 128, g) * torch.linspace(0.1, 3, 128)
    scheme = _scheme(4, False, 32)
    dyn = gptq_quantize(w, _hessian(x).float(), scheme, act_order=True)
    assert dyn.g_idx is not None and dyn.g_idx.dtype == torch.int32
    assert torch.bincount(dyn.g_idx.long()).tolist() == [32] * 4
    assert not torch.equal(dyn.g_idx.long(), torch.arange(128) // 32)
    assert dyn.scheme.weights.actorder == "group"
    static = gptq_quantize(w, _hessian(x).float(), scheme, act_order=True, static_groups=True)
    assert static.g_idx is None and static.scheme.weights.actorder == "static"
    scale, zero = weight_qparams(w, scheme.weights)
    assert torch.equal(static.scale, scale) and torch.equal(static.zero_point, zero)


def test_singular_hessian_is_finite_and_dead_columns_zero(caplog):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(8, 64, generator=g)  # rank 8 < 64
    x[:, :5] = 0  # dead columns
    qw = gptq_quantize(w, _hessian(x).float(), _scheme(4, True, 32))
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[:, :5] == 0).all()
    # Not positive definite even after 1% damping: retried with more, and logged.
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 1.04
    with caplog.at_level(logging.WARNING, logger="quantkit.quantizers.gptq"):
        qw = gptq_quantize(w, h, _scheme(4, True, 32), name="probe")
    assert torch.isfinite(qw.dequantize()).all()
    assert any("probe" in r.message and "dampening" in r.message for r in caplog.records)


def test_unrescuable_hessian_raises():
    w = torch.randn(8, 32)
    with pytest.raises(NumericsError) as e:
        gptq_quantize(w, -torch.eye(32), _scheme(4, True, 32), name="probe")
    assert e.value.file == "probe" and e.value.hint == (
        "check the calibration activations for NaN/Inf or use more calibration samples")
    with pytest.raises(NumericsError) as e:
        gptq_quantize(w, torch.full((32, 32), float("nan")), _scheme(4, True, 32), name="probe")
    assert e.value.file == "probe" and e.value.hint == "the calibration activations are not finite"


def test_hessian_accumulator_matches_float64():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 24, generator=g) for n in (7, 30, 1)]
    acc = HessianAccumulator()
    for x in xs:
        acc.add(x)
    ref = _hessian(torch.cat(xs))
    torch.testing.assert_close(acc.hessian().double(), ref, rtol=1e-5, atol=1e-6)


def test_quantizer_accumulates_each_shared_hessian_once(monkeypatch):
    layer, data, cfg = tiny_llama_layer(seed=6, batches=3)
    calls = {"n": 0}
    orig = HessianAccumulator.add

    def counting(self, x):
        calls["n"] += 1
        orig(self, x)

    monkeypatch.setattr(HessianAccumulator, "add", counting)
    params = GPTQParams(group_size=32, act_order=True)
    quantizer = QUANTIZERS["gptq"](params, cfg)
    calib = FakeCalibration(layer, data)
    out = quantizer.quantize_layer(layer, LLAMA, calib)
    assert set(out) == set(LLAMA.linears)
    assert calib.runs == 1
    # One hook per input group (q/k/v share one; gate/up share one), one call per batch.
    assert set(calib.hook_calls) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    assert calls["n"] == 4 * 3
    for name, qw in out.items():
        assert qw.shape == tuple(layer.get_submodule(name).weight.shape)
        assert torch.isfinite(qw.dequantize()).all()


def test_params_validation():
    with pytest.raises(Exception):
        GPTQParams(bits=3)
    with pytest.raises(Exception):
        GPTQParams(group_size=100)
    with pytest.raises(Exception):
        GPTQParams(unknown=1)
    s = GPTQParams(group_size=-1).scheme()
    assert s.weights.strategy == "channel" and s.weights.group_size is None
