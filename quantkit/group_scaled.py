"""A quantized Linear held as its integer codes with learnable group scales: ``quantkit tune``'s
student, ``W = (u − z)·s₀·exp(θ)``.

Computing that weight in float32 and letting autograd keep it cost about 12 bytes a parameter (the
dense weight as loaded, the codes as floats and the computed weight saved for backward); the
codes as int8 cost one. So the weight exists only inside one Linear's forward and again in
its backward, which recomputes it from the codes instead of saving it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def group_weight(steps: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``steps`` ``[out, in]`` (the codes less their zero points, integers) times ``scale``
    ``[out, groups]`` over each group's run of ``in / groups`` columns, in ``dtype``."""
    out, groups = scale.shape
    # An integer tensor times a float one is computed and returned in the float's dtype, so the
    # weight is allocated once and the steps are never copied to floats.
    return (steps.view(out, groups, -1) * scale.to(dtype).unsqueeze(-1)).view(steps.shape)


class _GroupScaledMatmul(torch.autograd.Function):
    """``x Wᵀ + b`` whose backward saves ``x`` and the scales but not ``W``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, steps: torch.Tensor, scale: torch.Tensor, theta: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, steps, scale, theta)
        return F.linear(x, group_weight(steps, scale * theta.exp(), x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        x, steps, scale, theta = ctx.saved_tensors
        s = scale * theta.exp()
        grad_x = grad @ group_weight(steps, s, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[3]:
            # ∂L/∂W = gᵀx, and W[o, i] = steps[o, i]·s[o, k] for i in group k, so
            # ∂L/∂θ[o, k] = s[o, k]·Σ_{i in k} (gᵀx)[o, i]·steps[o, i].
            out, groups = s.shape
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).float()
            grad_w = grad_w.view(out, groups, -1).mul_(steps.view(out, groups, -1))
            grad_theta = (grad_w.sum(-1) * s).to(theta.dtype)
        return grad_x, None, None, grad_theta, None


def group_scaled_linear(x: torch.Tensor, steps: torch.Tensor, scale: torch.Tensor, theta: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + bias`` with ``W = group_weight(steps, scale·exp(θ))`` in ``x``'s dtype,
    differentiable in ``x`` and ``theta`` (``x`` ``[..., in]``)."""
    return _GroupScaledMatmul.apply(x, steps, scale, theta, bias)


class GroupScaledLinear(nn.Module):
    """A Linear from fixed codes and learned scales.

    Training computes with the float32 scales, its product in ``products_dtype`` (its output
    back in the input's dtype, the scales' gradient summed in float32); evaluation in the
    input's dtype with the scales rounded to the checkpoint's, so what is measured after tuning
    is what the rewritten checkpoint holds."""

    def __init__(self, steps: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 products_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("steps", steps)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias)
        self.stored_dtype = scale.dtype
        self.products_dtype = products_dtype
        self.theta = nn.Parameter(torch.zeros_like(self.scale))

    def stored_scale(self) -> torch.Tensor:
        return (self.scale * self.theta.exp()).to(self.stored_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            pd = self.products_dtype
            bias = None if self.bias is None else self.bias.to(pd)
            return group_scaled_linear(x.to(pd), self.steps, self.scale, self.theta, bias).to(x.dtype)
        return F.linear(x, group_weight(self.steps, self.stored_scale(), x.dtype), self.bias)
