"""RTN: the shared numerics every quantizer builds on."""

from __future__ import annotations

import pytest
import torch

from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.rtn import RTNParams, quantize_rtn


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_rtn_round_trip_within_half_step(bits, symmetric, group_size):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g)
    w[0] = 0  # an all-zero row keeps a finite scale and exact zeros
    scheme = RTNParams(bits=bits, symmetric=symmetric, group_size=group_size).scheme()
    qw = quantize_rtn(w, scheme)
    ws = scheme.weights
    assert qw.codes.dtype == torch.int8
    assert int(qw.codes.min()) >= ws.qmin and int(qw.codes.max()) <= ws.qmax
    assert (qw.zero_point is None) == symmetric
    s = qw.scale if group_size == -1 else qw.scale.repeat_interleave(group_size, dim=1)
    err = (qw.dequantize().double() - w.double()).abs()
    # Half a step, plus float32 slack (the symmetric grid puts max|w| exactly half a step out).
    assert (err <= s.double() / 2 * (1 + 1e-4)).all()
    assert (qw.dequantize()[0] == 0).all()


def test_all_methods_registered():
    assert {"rtn", "gptq", "awq", "fp8", "dynamic_int8", "static_int8"} <= set(QUANTIZERS)
    for name, cls in QUANTIZERS.items():
        assert cls.Params().method == name
        assert cls.default_format == "compressed-tensors"
        assert isinstance(cls.needs_calibration, bool)
