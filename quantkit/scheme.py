"""The neutral quantized-weight representation where quantizers and formats meet.

Quantizers produce ``QuantizedWeight`` and never know about files; formats consume it and
never know which algorithm made it. Integer codes are always stored *signed and unpacked*
(``q`` in ``[-2**(b-1), 2**(b-1) - 1]``, zero points in the same range) and float codes as
their grid values in float8_e4m3fn (exact for FP8 E4M3 and FP4 E2M1), so that
``w ≈ (q - z) * s / g`` holds for every scheme (``g``: a tensor-group's global scale, else 1);
each format shifts to its own convention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .grids import FP8_DTYPE, FP8_MAX, Grid, NumType, ScaleFormat, effective_scale, grid_for
from .scale_layout import ScaleLayout

Strategy = Literal["tensor", "channel", "group", "block", "tensor_group"]
ActStrategy = Literal["tensor", "token", "group", "tensor_group"]

__all__ = ["FP8_DTYPE", "FP8_MAX", "ActivationScheme", "QuantizedWeight", "Scheme", "WeightScheme"]


def _layout(strategy: str, group_size: int | None, block_size: tuple[int, int] | None = None) -> ScaleLayout:
    """The scale layout of a weight or activation strategy: a channel (weights) or a token
    (activations) is one row of scales."""
    if strategy in ("group", "tensor_group"):
        return ScaleLayout("group", group=group_size)
    if strategy == "block":
        return ScaleLayout("block", block=block_size)
    return ScaleLayout("row" if strategy in ("channel", "token") else "tensor")


@dataclass(frozen=True)
class WeightScheme:
    """How a weight is quantized.

    ``group_size`` is set for the group and tensor_group strategies (tensor_group: groups with
    their own scale, all divided by one global scale of the tensor, as NVFP4), ``block_size``
    (rows, columns) for the block strategy. ``scale_format`` says what values a scale may take
    (see ``quantkit.grids``): any float, E4M3 values (with tensor_group) or powers of two (E8M0).
    """

    num_bits: int = 4
    type: NumType = "int"
    symmetric: bool = True
    strategy: Strategy = "group"
    group_size: int | None = 128
    # None: natural column order. "static": columns quantized in activation order but groups
    # stay contiguous (no g_idx needed). "group": groups follow activation order (g_idx).
    actorder: Literal["static", "group"] | None = None
    block_size: tuple[int, int] | None = None
    scale_format: ScaleFormat = "float"

    def __post_init__(self) -> None:
        if self.block_size is not None:  # JSON round trips turn the tuple into a list
            object.__setattr__(self, "block_size", tuple(self.block_size))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    @property
    def grid(self) -> Grid:
        return grid_for(self.type, self.num_bits)

    @property
    def layout(self) -> ScaleLayout:
        return _layout(self.strategy, self.group_size, self.block_size)

    @property
    def has_global_scale(self) -> bool:
        return self.strategy == "tensor_group"


@dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's input activations are quantized at inference time.

    ``group`` and ``tensor_group`` split each token into groups of ``group_size``;
    ``tensor_group`` scales (NVFP4) are computed per token group at run time and divided by
    a static global scale calibrated per tensor (``QuantizedWeight.input_global_scale``).
    """

    num_bits: int = 8
    type: NumType = "int"
    symmetric: bool = True
    strategy: ActStrategy = "token"
    dynamic: bool = True
    group_size: int | None = None
    scale_format: ScaleFormat = "float"

    @property
    def grid(self) -> Grid:
        return grid_for(self.type, self.num_bits)

    @property
    def layout(self) -> ScaleLayout:
        return _layout(self.strategy, self.group_size)

    @property
    def has_global_scale(self) -> bool:
        return self.strategy == "tensor_group"


@dataclass(frozen=True)
class Scheme:
    """The full scheme of one Linear: weights plus optional input activations."""

    weights: WeightScheme
    input_activations: ActivationScheme | None = None

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None


@dataclass
class QuantizedWeight:
    """One Linear's quantized weight.

    Shapes, for a weight of shape ``[out, in]``:
      - ``codes``: ``[out, in]``; int8 (any bit width up to 8, signed) or float8_e4m3fn
        (FP8 codes, or FP4 E2M1 values, which E4M3 holds exactly).
      - ``scale``: float32 in the scheme's layout (``quantkit.scale_layout``): ``[out, in // g]``
        (group, tensor_group), ``[ceil(out / b0), ceil(in / b1)]`` (block), ``[out, 1]``
        (channel) or ``[1]`` (tensor).
      - ``zero_point``: same shape as ``scale``, int8, or None when symmetric.
      - ``global_scale``: ``[1]`` float32 divisor of every scale (tensor_group), else None.
      - ``g_idx``: ``[in]`` int32, the group of each input column, or None for the natural
        order (``g_idx[i] == i // group_size``).
      - ``input_scale``: ``[1]`` float32 static activation scale, or None (dynamic/weight-only).
      - ``input_global_scale``: ``[1]`` float32 static global divisor of tensor_group
        activation scales (NVFP4 W4A4), else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scheme: Scheme
    g_idx: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None

    TENSORS = ("codes", "scale", "zero_point", "g_idx", "input_scale", "global_scale", "input_global_scale")
    """Every tensor field, for code that moves or stores them all."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a tensor laid out like ``scale``) with one value per weight element."""
        rows, cols = self.shape
        return self.scheme.weights.layout.expand(t, rows, cols, self.g_idx)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this stands for: ``(q - z) * s / g`` broadcast over the layout."""
        q = self.codes.to(torch.float32)
        if self.zero_point is not None:
            q = q - self.expand(self.zero_point.to(torch.float32))
        scale = effective_scale(self.scale.to(torch.float32), self.global_scale)
        return (q * self.expand(scale)).to(dtype)


def quantized_as_tensors(weights: dict[str, QuantizedWeight]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Quantized Linears as plain tensors (``"<name>.<field>"``) and their schemes as JSON-able
    data: how the work folder stores them and how ranks exchange them."""
    tensors, schemes = {}, {}
    for name, qw in weights.items():
        act = qw.scheme.input_activations
        schemes[name] = {"weights": asdict(qw.scheme.weights), "input_activations": asdict(act) if act else None}
        for f in QuantizedWeight.TENSORS:
            t = getattr(qw, f)
            if t is not None:
                tensors[f"{name}.{f}"] = t
    return tensors, schemes


def quantized_from_tensors(tensors: dict[str, torch.Tensor], schemes: dict[str, dict]) -> dict[str, QuantizedWeight]:
    """The inverse of ``quantized_as_tensors``."""
    out = {}
    for name, s in schemes.items():
        act = s["input_activations"]
        scheme = Scheme(WeightScheme(**s["weights"]), ActivationScheme(**act) if act else None)
        out[name] = QuantizedWeight(scheme=scheme, **{f: tensors.get(f"{name}.{f}") for f in QuantizedWeight.TENSORS})
    return out
