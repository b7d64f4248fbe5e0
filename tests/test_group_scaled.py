"""The int-coded Linear tune trains: its product and both gradients against float64 autograd
through the weight it never keeps, and its evaluation with the scales as the checkpoint stores them."""

from __future__ import annotations

import pytest
import torch

from quantkit.group_scaled import GroupScaledLinear, group_scaled_linear


def _reference(x, steps, scale, theta, bias):
    """``x Wᵀ + b`` through the dense weight ``(u − z)·s₀·exp(θ)``, as autograd sees it."""
    w = steps * (scale * theta.exp()).repeat_interleave(steps.shape[1] // scale.shape[1], dim=1)
    return x @ w.T + (0 if bias is None else bias)


@pytest.mark.parametrize("group", [4, 32, 96])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("steps_dtype", [torch.int8, torch.int16])
def test_product_and_gradients_match_float64_autograd(group, with_bias, steps_dtype):
    """Fresh random ``[batch, seq, in]`` inputs; float32 against float64 to 1e-5 relative."""
    g = torch.Generator().manual_seed(group + 2 * with_bias + (steps_dtype == torch.int16))
    out, inputs = 24, 96
    limit = 15 if steps_dtype == torch.int8 else 255
    steps = torch.randint(-limit, limit + 1, (out, inputs), generator=g).to(steps_dtype)
    scale = torch.rand(out, inputs // group, generator=g) / limit + 1e-3
    theta = (torch.randn(out, inputs // group, generator=g) * 0.1).requires_grad_()
    bias = torch.randn(out, generator=g) if with_bias else None
    x = torch.randn(3, 5, inputs, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, out, generator=g)

    y = group_scaled_linear(x, steps, scale, theta, bias)
    grad_x, grad_theta = torch.autograd.grad(y, (x, theta), upstream)

    x64, theta64 = x.detach().double().requires_grad_(), theta.detach().double().requires_grad_()
    y64 = _reference(x64, steps.double(), scale.double(), theta64, None if bias is None else bias.double())
    grad_x64, grad_theta64 = torch.autograd.grad(y64, (x64, theta64), upstream.double())

    assert y.dtype == grad_x.dtype == grad_theta.dtype == torch.float32
    for got, expect in ((y, y64), (grad_x, grad_x64), (grad_theta, grad_theta64)):
        torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


def test_the_codes_get_no_gradient_and_x_only_when_asked():
    g = torch.Generator().manual_seed(7)
    steps = torch.randint(-7, 8, (4, 16), generator=g, dtype=torch.int8)
    theta = torch.zeros(4, 2, requires_grad=True)
    x = torch.randn(2, 16, generator=g)
    y = group_scaled_linear(x, steps, torch.rand(4, 2, generator=g), theta)
    y.sum().backward()
    assert theta.grad is not None and x.grad is None and steps.grad is None


def test_evaluation_uses_the_scales_as_stored_and_training_the_float32_ones():
    """In eval mode the weight is the codes times the tuned scales rounded to the checkpoint's
    dtype (what the rewritten checkpoint holds); in training, times the float32 ones."""
    g = torch.Generator().manual_seed(3)
    steps = torch.randint(-7, 8, (8, 64), generator=g, dtype=torch.int8)
    stored = (torch.rand(8, 2, generator=g) + 0.5).bfloat16()
    bias = torch.randn(8, generator=g)
    module = GroupScaledLinear(steps, stored, bias)
    with torch.no_grad():
        module.theta.copy_(torch.randn(8, 2, generator=g) * 0.01)
    x = torch.randn(5, 64, generator=g)

    tuned = stored.double() * module.theta.detach().double().exp()
    as_stored = tuned.to(torch.bfloat16).double()
    expect_tuned, expect_stored = (x.double() @ (steps.double() * s.repeat_interleave(32, dim=1)).T + bias.double()
                                   for s in (tuned, as_stored))
    with torch.no_grad():
        module.eval()
        evaluated = module(x).double()
        module.train()
        trained = module(x).double()
    torch.testing.assert_close(evaluated, expect_stored, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, expect_tuned, rtol=1e-5, atol=1e-5)
    assert (expect_tuned - expect_stored).abs().max() > 1e-3  # the two cases differ here


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_products_stay_within_bf16_rounding_of_float64_and_hand_back_float32(with_bias):
    """Training with ``products_dtype=bfloat16`` (tune on a GPU): the output comes back in the
    input's float32 and θ's gradient in float32, each within bf16's rounding (2⁻⁸) of the float64
    reference; the float32 path on the same inputs is a thousand times closer, so the tolerance
    is about the product's dtype, not the test's slack."""
    g = torch.Generator().manual_seed(11 + with_bias)
    out, inputs, group = 32, 256, 64
    steps = torch.randint(-15, 16, (out, inputs), generator=g).to(torch.int8)
    scale = torch.rand(out, inputs // group, generator=g) / 15 + 1e-3
    bias = torch.randn(out, generator=g) if with_bias else None
    x = torch.randn(4, 8, inputs, generator=g)
    upstream = torch.randn(4, 8, out, generator=g)
    theta64 = torch.zeros(out, inputs // group, dtype=torch.float64, requires_grad=True)
    y64 = _reference(x.double(), steps.double(), scale.double(), theta64, None if bias is None else bias.double())
    (grad64,) = torch.autograd.grad(y64, theta64, upstream.double())

    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        module = GroupScaledLinear(steps, scale, bias, products_dtype=dtype).train()
        y = module(x)
        (grad,) = torch.autograd.grad(y, module.theta, upstream)
        assert y.dtype == grad.dtype == torch.float32
        errors[dtype] = max(((y.double() - y64).abs().max() / y64.abs().max()).item(),
                            ((grad.double() - grad64).abs().max() / grad64.abs().max()).item())
    assert errors[torch.bfloat16] < 2 ** -6
    assert errors[torch.float32] < errors[torch.bfloat16] / 1000
