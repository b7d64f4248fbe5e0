"""Simulated activation quantization against a float64 reference."""

from __future__ import annotations

import torch

from quantkit.activations import fake_quantize_activation
from quantkit.scheme import FP8_DTYPE, ActivationScheme


def _x(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 64, generator=g)
    x[..., 5] *= 40  # an outlier channel
    return x


def test_int8_per_token_dynamic_matches_float64_reference():
    for seed in range(3):
        x = _x(seed)
        got = fake_quantize_activation(x, ActivationScheme(8, "int", True, "token", True), None)
        xd = x.double()
        scale = xd.abs().amax(-1, keepdim=True) / 127
        want = torch.round(xd / scale).clamp(-128, 127) * scale
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
        assert ((got.double() - xd).abs() <= scale / 2 + 1e-5).all()


def test_int8_static_uses_the_calibrated_scale_and_clips():
    x = _x(4)
    scale = torch.tensor([0.05])
    got = fake_quantize_activation(x, ActivationScheme(8, "int", True, "tensor", False), scale)
    want = torch.round(x.double() / 0.05).clamp(-128, 127) * 0.05
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert got.abs().max() <= 128 * 0.05 + 1e-6  # the outlier channel is clipped at the static range


def test_fp8_dynamic_values_are_e4m3_grid_points():
    x = _x(5)
    got = fake_quantize_activation(x, ActivationScheme(8, "float", True, "token", True), None)
    scale = x.abs().amax(-1, keepdim=True) / 448
    codes = got / scale
    assert torch.allclose(codes.to(FP8_DTYPE).float(), codes, rtol=1e-5, atol=1e-6)  # on the E4M3 grid
    assert ((got - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -9).all()  # E4M3: 3 mantissa bits
