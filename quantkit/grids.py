"""The value grids quantized numbers live on, and the scales that map tensors onto them.

Pure functions over tensors, shared by weights (RTN, GPTQ) and activations (simulation,
observers), so every path rounds the same way:

  - grids: signed ints of 2..8 bits, FP8 E4M3 (max 448) and FP4 E2M1 (values 0, 0.5, 1, 1.5,
    2, 3, 4, 6 and their negatives), all rounded to nearest, ties to even, saturating;
  - scale formats: a plain float, an FP8-E4M3 value that is divided by one FP32 global scale
    per tensor (NVFP4's "tensor group": ``w ≈ q · s / g``), or a power of two (E8M0, MXFP4).

Conventions follow compressed-tensors 0.20 (``calculate_qparams``, ``generate_gparam``,
``generate_mx_scales``), which is what llm-compressor writes and vLLM reads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NumType = Literal["int", "float"]
ScaleFormat = Literal["float", "e4m3", "e8m0"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
FP4_MAX = 6.0
TINY = 1e-12
E4M3_ZERO_SCALE = 0.125
"""What a zero E4M3 group scale becomes (compressed-tensors' ``_get_dtype_eps``): the group's
values are all zero then, so any positive scale codes them exactly."""
E8M0_EXP_RANGE = (-127, 127)


@dataclass(frozen=True)
class Grid:
    """The representable code values of one number type."""

    type: NumType
    bits: int
    exponent_bits: int = 0
    mantissa_bits: int = 0

    @property
    def qmin(self) -> float:
        return -(2 ** (self.bits - 1)) if self.type == "int" else -self.max

    @property
    def qmax(self) -> float:
        return 2 ** (self.bits - 1) - 1 if self.type == "int" else self.max

    @property
    def max(self) -> float:
        """Largest magnitude (int: the positive end, the negative end is one further)."""
        if self.type == "int":
            return 2 ** (self.bits - 1) - 1
        return FP8_MAX if (self.exponent_bits, self.mantissa_bits) == (4, 3) else _minifloat_max(self)

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (bias 2**(e-1) - 1)."""
        return 2 - 2 ** (self.exponent_bits - 1)

    @property
    def code_dtype(self) -> torch.dtype:
        """How codes are kept unpacked: int8, or float8_e4m3fn (exact for E4M3 and E2M1)."""
        return torch.int8 if self.type == "int" else FP8_DTYPE


def _minifloat_max(grid: Grid) -> float:
    # No infinities or NaN encodings reserved (E2M1 as OCP defines it).
    top = 2 ** (grid.exponent_bits - 1)
    return 2.0**top * (2 - 2.0**-grid.mantissa_bits)


E4M3 = Grid("float", 8, 4, 3)
E2M1 = Grid("float", 4, 2, 1)


def grid_for(type: NumType, bits: int) -> Grid:
    """The grid of a scheme's numbers; a ValueError for a float width with no grid here."""
    if type == "int":
        if not 2 <= bits <= 8:
            raise ValueError(f"int grids have 2 to 8 bits, got {bits}")
        return Grid("int", bits)
    floats = {8: E4M3, 4: E2M1}
    if bits not in floats:
        raise ValueError(f"float grids are FP8 E4M3 or FP4 E2M1, not {bits} bits")
    return floats[bits]


def round_to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``x`` (already divided by its scale) rounded onto ``grid``, float32 values."""
    x = x.to(torch.float32)
    if grid.type == "int":
        return torch.round(x).clamp(grid.qmin, grid.qmax)
    if grid == E4M3:  # the hardware cast is the definition of E4M3 rounding
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32)
    return round_minifloat(x, grid)


def round_minifloat(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round to the nearest value of a sign/exponent/mantissa float with no inf/NaN codes,
    ties to even, saturating at ``±grid.max``. Values below the smallest normal share the
    subnormal step ``2**(emin - mantissa_bits)``."""
    a = x.to(torch.float32).abs()
    # exponent of each value's binade, never below the subnormal one
    e = torch.floor(torch.log2(a.clamp_min(2.0**grid.emin))).clamp_min(grid.emin)
    step = torch.exp2(e - grid.mantissa_bits)
    q = torch.round(a / step) * step  # torch.round rounds half to even
    return torch.copysign(q.clamp_max(grid.max), x)


def weight_divisor(grid: Grid) -> float:
    """``amax / divisor`` is a weight's symmetric scale: half the int range (the GPTQ
    reference's and compressed-tensors' choice, so zero is code 0), or the float maximum."""
    return (grid.qmax - grid.qmin) / 2 if grid.type == "int" else grid.max


def activation_divisor(grid: Grid) -> float:
    """``amax / divisor`` is an activation's scale as vLLM's kernels compute it: ``qmax``
    for int8 (per-token ``amax / 127``), the float maximum otherwise."""
    return grid.qmax if grid.type == "int" else grid.max


def global_scale(amax: torch.Tensor, grid: Grid) -> torch.Tensor:
    """NVFP4's per-tensor global scale ``448 · 6 / amax`` (a divisor, float32 ``[1]``): it
    stretches the tensor's largest group scale onto E4M3's largest value. 1 for an all-zero
    tensor, as compressed-tensors' ``generate_gparam`` gives."""
    a = amax.to(torch.float32).reshape(1)
    g = FP8_MAX * grid.max / a.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def symmetric_scale(amax: torch.Tensor, divisor: float, fmt: ScaleFormat,
                    global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The stored scale for groups whose largest magnitude is ``amax`` (float32, same shape).

    ``float``: ``amax / divisor`` (at least 1e-12). ``e4m3``: ``amax / divisor · global``
    rounded to E4M3, the value NVFP4 stores next to ``global``; a zero becomes 0.125.
    ``e8m0``: a power of two, ``2**(floor(log2(amax')) - floor(log2(divisor)))`` where ``amax'``
    is ``amax`` rounded up to the next power of two when its mantissa is at least 1.75
    (compressed-tensors' ``generate_mx_scales``: a 7/4 binade would clip beyond 6 otherwise).
    """
    a = amax.to(torch.float32)
    if fmt == "float":
        return (a / divisor).clamp_min(TINY)
    if fmt == "e4m3":
        if global_scale is None:
            raise ValueError("e4m3 scales need the tensor's global scale")
        s = (a / divisor * global_scale.to(a.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32)
        return torch.where(s == 0, torch.full_like(s, E4M3_ZERO_SCALE), s)
    mantissa, exponent = torch.frexp(a)  # a = mantissa · 2**exponent, mantissa in [0.5, 1)
    binade = exponent - 1 + (mantissa >= 0.875).to(exponent.dtype)
    e = (binade - math.floor(math.log2(divisor))).clamp(*E8M0_EXP_RANGE)
    return torch.exp2(e.to(torch.float32))


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """The multiplier a code stands for: ``scale``, or ``scale / global`` with a global scale."""
    return scale if global_scale is None else scale / global_scale.to(scale.device)
