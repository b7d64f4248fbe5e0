"""Scale refit against a float64 least-squares reference, and wired into GPTQ."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.gptq import GPTQParams, gptq_quantize
from quantkit.quantizers.rtn import quantize_rtn
from quantkit.quantizers.scale_refit import refit_scales
from quantkit.scheme import Scheme, WeightScheme

from .helpers import FakeCalibration, correlated_inputs, llama_graph, tiny_llama_layer


def _scheme(sym: bool, group: int) -> Scheme:
    if group == -1:
        return Scheme(WeightScheme(num_bits=4, symmetric=sym, strategy="channel", group_size=None))
    return Scheme(WeightScheme(num_bits=4, symmetric=sym, strategy="group", group_size=group))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return x.T.double() @ x.double() / x.shape[0]


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(w − ŵ)ᵀ H (w − ŵ)`` per row, in float64."""
    e = w.double() - w_hat.double()
    return ((e @ h.double()) * e).sum(1)


def _reference_scales(w: torch.Tensor, qw, h: torch.Tensor) -> torch.Tensor:
    """Per row, the scales minimising ``(w − A s)ᵀ H (w − A s)`` with the design ``A``
    ``[in, G]`` written out (column g: the row's codes minus zero point on group g's columns),
    solved as least squares on ``Lᵀ A`` (``H = L Lᵀ``) in float64."""
    rows, in_f = qw.shape
    n_g = qw.scale.shape[1]
    gs = in_f // n_g
    low = torch.linalg.cholesky(h.double())
    out = torch.empty(rows, n_g, dtype=torch.float64)
    for r in range(rows):
        a = qw.codes[r].double()
        if qw.zero_point is not None:
            a = a - qw.zero_point[r].double().repeat_interleave(gs)
        design = torch.zeros(in_f, n_g, dtype=torch.float64)
        for g in range(n_g):
            design[g * gs:(g + 1) * gs, g] = a[g * gs:(g + 1) * gs]
        out[r] = torch.linalg.lstsq(low.T @ design, (low.T @ w[r].double()).unsqueeze(1)).solution[:, 0]
    return out


@pytest.mark.parametrize("sym,group", [(True, 8), (False, 8), (False, -1)])
def test_refit_is_the_least_squares_optimum_and_never_worse(sym, group):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 32, generator=g)
    h = _hessian(correlated_inputs(256, 32, g))
    qw = quantize_rtn(w, _scheme(sym, group))
    got = refit_scales(w, qw, h, dampening_frac=1e-12)  # no damping to speak of: the exact optimum
    torch.testing.assert_close(got.scale.double(), _reference_scales(w, qw, h), rtol=1e-4, atol=1e-7)
    before, after = proxy_loss(w, qw.dequantize(), h), proxy_loss(w, got.dequantize(), h)
    assert (after <= before).all() and (after < before).any()
    assert torch.equal(got.codes, qw.codes)
    assert (got.zero_point is None) == sym and (sym or torch.equal(got.zero_point, qw.zero_point))


def test_refit_of_gptq_codes_lowers_each_rows_error_with_the_default_damping():
    g = torch.Generator().manual_seed(12)
    for _ in range(3):
        w = torch.randn(32, 128, generator=g)
        h = _hessian(correlated_inputs(512, 128, g))
        qw = gptq_quantize(w, h.float(), _scheme(False, 32), act_order=True, static_groups=True)
        refit = gptq_quantize(w, h.float(), _scheme(False, 32), act_order=True, static_groups=True,
                              refit_scales=True)
        assert torch.equal(refit.codes, qw.codes)
        before, after = proxy_loss(w, qw.dequantize(), h), proxy_loss(w, refit.dequantize(), h)
        assert (after <= before).all() and after.sum() < 0.99 * before.sum()


def test_refit_keeps_scales_it_cannot_fit_and_ignores_dead_inputs():
    g = torch.Generator().manual_seed(13)
    w = torch.randn(4, 32, generator=g)
    x = correlated_inputs(256, 32, g)
    x[:, 3] = 0  # a dead input column
    h = _hessian(x)
    qw = quantize_rtn(w, _scheme(True, 8))
    qw.codes[0, 8:16] = 0  # a group whose codes are all zero: its scale does not matter
    got = refit_scales(w, qw, h)
    assert got.scale[0, 1] == qw.scale[0, 1]
    assert torch.isfinite(got.scale).all() and (got.scale > 0).all()
    assert (proxy_loss(w, got.dequantize(), h) <= proxy_loss(w, qw.dequantize(), h)).all()


def test_refit_scales_option_needs_int_groups_in_natural_order():
    assert GPTQParams(refit_scales=True, symmetric=False).refit_scales
    assert not GPTQParams().refit_scales
    with pytest.raises(ValidationError, match="int group or channel"):
        GPTQParams(refit_scales=True, scheme="NVFP4")
    with pytest.raises(ValidationError, match="static_groups"):
        GPTQParams(refit_scales=True, static_groups=False)
    assert GPTQParams(refit_scales=True, static_groups=False, act_order=False).refit_scales


def test_quantizer_refits_the_scales_of_every_linear():
    layer, data, cfg = tiny_llama_layer(seed=6, batches=2)
    graph = llama_graph()
    out = {}
    for refit in (False, True):
        quantizer = QUANTIZERS["gptq"](GPTQParams(group_size=32, symmetric=False, refit_scales=refit), cfg)
        out[refit] = quantizer.quantize_layer(layer, graph, FakeCalibration(layer, data))
    for name in graph.linears:
        assert torch.equal(out[True][name].codes, out[False][name].codes)
        assert not torch.equal(out[True][name].scale, out[False][name].scale), name
