"""Round-to-nearest: the shared numerics every quantizer builds on.

Pure functions over tensors. ``qparams`` picks scale and zero point for independent rows
(a row is a channel, a group, or the whole tensor flattened), ``quantize_codes`` rounds
with given parameters, and ``quantize_rtn`` combines them for a whole weight.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..scheme import FP8_DTYPE, FP8_MAX, QuantizedWeight, Scheme, WeightScheme
from .base import LayerCalibration, Quantizer, QuantizerParams, register_quantizer

_TINY = 1e-12


def qparams(rows: torch.Tensor, ws: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale ``[r, 1]`` (float32) and zero point (int8 or None) for each row of ``rows``.

    Symmetric int uses ``amax / ((qmax - qmin) / 2)``, the convention shared by the GPTQ
    reference and compressed-tensors, so zero sits at code 0. The asymmetric range always
    contains 0 so that exact zeros stay exact.
    """
    rows = rows.to(torch.float32)
    if ws.type == "float":
        amax = rows.abs().amax(dim=1, keepdim=True)
        return (amax / FP8_MAX).clamp_min(_TINY), None
    if ws.symmetric:
        amax = rows.abs().amax(dim=1, keepdim=True)
        return (amax / ((ws.qmax - ws.qmin) / 2)).clamp_min(_TINY), None
    lo = rows.amin(dim=1, keepdim=True).clamp_max(0)
    hi = rows.amax(dim=1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (ws.qmax - ws.qmin)).clamp_min(_TINY)
    zero = (ws.qmin - torch.round(lo / scale)).clamp(ws.qmin, ws.qmax)
    return scale, zero.to(torch.int8)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, ws: WeightScheme
) -> torch.Tensor:
    """Codes of ``w`` under broadcastable ``scale``/``zero``: int8 or float8_e4m3fn."""
    x = w.to(torch.float32) / scale
    if ws.type == "float":
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if zero is not None:
        x = x + zero.to(torch.float32)
    return torch.round(x).clamp(ws.qmin, ws.qmax).to(torch.int8)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    q = codes.to(torch.float32)
    if zero is not None:
        q = q - zero.to(torch.float32)
    return q * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, ws: WeightScheme) -> torch.Tensor:
    """``w`` rounded onto the grid and mapped back to float32."""
    return dequantize_codes(quantize_codes(w, scale, zero, ws), scale, zero)


def weight_qparams(w: torch.Tensor, ws: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of a whole ``[out, in]`` weight in the layout QuantizedWeight keeps."""
    out_f, in_f = w.shape
    if ws.strategy == "tensor":
        scale, zero = qparams(w.reshape(1, -1), ws)
        return scale.reshape(1), None if zero is None else zero.reshape(1)
    if ws.strategy == "channel":
        return qparams(w, ws)
    g = ws.group_size or in_f
    scale, zero = qparams(w.reshape(out_f * (in_f // g), g), ws)
    shape = (out_f, in_f // g)
    return scale.reshape(shape), None if zero is None else zero.reshape(shape)


def broadcast_qparams(
    scale: torch.Tensor, zero: torch.Tensor | None, ws: WeightScheme, in_features: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expand group-wise parameters to one column per input feature (natural order)."""
    if ws.strategy != "group":
        return scale, zero
    g = ws.group_size or in_features
    scale = scale.repeat_interleave(g, dim=1)
    return scale, None if zero is None else zero.repeat_interleave(g, dim=1)


def quantize_rtn(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round every weight to the nearest grid point of its own row/group/tensor."""
    ws = scheme.weights
    if ws.strategy == "group" and w.shape[1] % (ws.group_size or w.shape[1]):
        raise ValueError(f"in_features {w.shape[1]} is not a multiple of group_size {ws.group_size}")
    scale, zero = weight_qparams(w, ws)
    s, z = broadcast_qparams(scale, zero, ws, w.shape[1])
    codes = quantize_codes(w, s, z, ws)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, scheme=scheme)


class RTNParams(QuantizerParams):
    """Weight-only round-to-nearest: the fast baseline every other method must beat."""

    method: Literal["rtn"] = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def scheme(self) -> Scheme:
        return weight_only_scheme(self.bits, self.group_size, self.symmetric)


def weight_only_scheme(bits: int, group_size: int, symmetric: bool, actorder: str | None = None) -> Scheme:
    """The W{bits}A16 scheme of the weight-only methods; ``group_size`` -1 means per channel."""
    channel = group_size == -1
    return Scheme(WeightScheme(num_bits=bits, symmetric=symmetric, strategy="channel" if channel else "group",
                               group_size=None if channel else group_size, actorder=None if channel else actorder))


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    Params = RTNParams
    needs_calibration = False

    def quantize_layer(self, layer, graph, calib: LayerCalibration) -> dict[str, QuantizedWeight]:
        return {u.name: quantize_rtn(u.matrix(layer).detach(), self.scheme) for u in graph.units}
