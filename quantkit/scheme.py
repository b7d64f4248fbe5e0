"""The neutral quantized-weight representation where quantizers and formats meet.

Quantizers produce ``QuantizedWeight`` and never know about files; formats consume it and
never know which algorithm made it. Integer codes are always stored *signed and unpacked*
(``q`` in ``[-2**(b-1), 2**(b-1) - 1]``, zero points in the same range) so that
``w ≈ (q - z) * s`` holds for every scheme; each format shifts to its own convention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

Strategy = Literal["tensor", "channel", "group"]
ActStrategy = Literal["tensor", "token"]
NumType = Literal["int", "float"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


@dataclass(frozen=True)
class WeightScheme:
    """How a weight is quantized. ``group_size`` is set only for the group strategy."""

    num_bits: int = 4
    type: NumType = "int"
    symmetric: bool = True
    strategy: Strategy = "group"
    group_size: int | None = 128
    # None: natural column order. "static": columns quantized in activation order but groups
    # stay contiguous (no g_idx needed). "group": groups follow activation order (g_idx).
    actorder: Literal["static", "group"] | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1


@dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's input activations are quantized at inference time."""

    num_bits: int = 8
    type: NumType = "int"
    symmetric: bool = True
    strategy: ActStrategy = "token"
    dynamic: bool = True


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
      - ``codes``: ``[out, in]``; int8 (any bit width up to 8, signed) or float8_e4m3fn.
      - ``scale``: ``[out, in // group_size]`` (group), ``[out, 1]`` (channel) or ``[1]`` (tensor);
        float32.
      - ``zero_point``: same shape as ``scale``, int8, or None when symmetric.
      - ``g_idx``: ``[in]`` int32, the group of each input column, or None for the natural
        order (``g_idx[i] == i // group_size``).
      - ``input_scale``: ``[1]`` float32 static activation scale, or None (dynamic/weight-only).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scheme: Scheme
    g_idx: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this stands for: ``(q - z) * s`` broadcast over groups."""
        q = self.codes.to(torch.float32)
        scale = self.scale.to(torch.float32)
        zero = None if self.zero_point is None else self.zero_point.to(torch.float32)
        if self.scheme.weights.strategy == "group":
            cols = expand_group_index(self)
            scale = scale[:, cols]
            zero = None if zero is None else zero[:, cols]
        if zero is not None:
            q = q - zero
        return (q * scale).to(dtype)


def expand_group_index(qw: QuantizedWeight) -> torch.Tensor:
    """Group of each input column: ``g_idx`` when act-order permuted them, else ``i // g``."""
    if qw.g_idx is not None:
        return qw.g_idx.long()
    in_features = qw.codes.shape[1]
    group = qw.scheme.weights.group_size or in_features
    return torch.arange(in_features, device=qw.codes.device) // group


_FIELDS = ("codes", "scale", "zero_point", "g_idx", "input_scale")


def quantized_as_tensors(weights: dict[str, QuantizedWeight]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Quantized Linears as plain tensors (``"<name>.<field>"``) and their schemes as JSON-able
    data: how the work folder stores them and how ranks exchange them."""
    tensors, schemes = {}, {}
    for name, qw in weights.items():
        act = qw.scheme.input_activations
        schemes[name] = {"weights": asdict(qw.scheme.weights), "input_activations": asdict(act) if act else None}
        for f in _FIELDS:
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
        out[name] = QuantizedWeight(scheme=scheme, **{f: tensors.get(f"{name}.{f}") for f in _FIELDS})
    return out
