"""Round-to-nearest: the shared numerics every quantizer builds on.

Pure functions over tensors. ``weight_qparams`` picks a weight's scale and zero point in its
scheme's layout (``quantkit.scale_layout``) on its grid (``quantkit.grids``),
``quantize_codes`` rounds with given per-element parameters, and ``quantize_rtn`` combines
them for a whole weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ..graph.types import LayerGraph
from ..grids import effective_scale, global_scale, round_to_grid, symmetric_scale, weight_divisor
from ..scheme import QuantizedWeight, Scheme, WeightScheme
from .activation_params import observe_input_globals, observes_inputs
from .base import LayerCalibration, Quantizer, register_quantizer
from .scheme_params import SchemeParams

_TINY = 1e-12


def weight_qparams(w: torch.Tensor, ws: WeightScheme, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32) and zero point (int8 or None) of ``w`` ``[out, in]`` in ``ws``'s layout.

    Symmetric schemes take ``amax / divisor`` rounded to the scale format (``symmetric_scale``;
    tensor_group scales need the tensor's ``global_scale``). Symmetric int uses
    ``amax / ((qmax - qmin) / 2)``, the convention shared by the GPTQ reference and
    compressed-tensors, so zero sits at code 0. The asymmetric (int only) range always
    contains 0 so that exact zeros stay exact.
    """
    layout = ws.layout
    if ws.symmetric:
        amax = layout.amax(w)
        return range_qparams(-amax, amax, ws, global_scale)
    return range_qparams(layout.reduce(w, torch.amin).clamp_max(0), layout.reduce(w, torch.amax).clamp_min(0), ws)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, ws: WeightScheme, global_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) of entries whose range is ``[lo, hi]`` (``lo``
    ≤ 0 ≤ ``hi``, float32; symmetric schemes read only ``hi``, the largest magnitude): what
    ``weight_qparams`` gives a weight of that range, in any shape of groups."""
    grid = ws.grid
    if ws.symmetric:
        return symmetric_scale(hi, weight_divisor(grid), ws.scale_format, global_scale), None
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(_TINY)
    zero = (grid.qmin - torch.round(lo / scale)).clamp(grid.qmin, grid.qmax)
    return scale, zero.to(torch.int8)


def weight_global_scale(weights: Sequence[torch.Tensor], ws: WeightScheme) -> torch.Tensor | None:
    """The global scale of a tensor_group scheme, shared by ``weights`` (shards a server
    fuses into one matrix must share it: vLLM keeps one per fused matrix); None otherwise."""
    if not ws.has_global_scale:
        return None
    amax = torch.stack([w.detach().abs().amax().to(torch.float32) for w in weights]).amax()
    return global_scale(amax, ws.grid)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, ws: WeightScheme) -> torch.Tensor:
    """Codes of ``w`` under broadcastable effective ``scale``/``zero``: int8 or float8_e4m3fn."""
    x = w.to(torch.float32) / scale
    if zero is not None:
        x = x + zero.to(torch.float32)
    return round_to_grid(x, ws.grid).to(ws.grid.code_dtype)


def quantize_rtn(w: torch.Tensor, scheme: Scheme, global_scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Round every weight to the nearest grid point of its own scale entry.

    A tensor_group scheme takes ``global_scale`` (shared across fused shards, see
    ``weight_global_scale``), or computes the weight's own.
    """
    ws = scheme.weights
    if ws.strategy in ("group", "tensor_group") and w.shape[1] % (ws.group_size or w.shape[1]):
        raise ValueError(f"in_features {w.shape[1]} is not a multiple of group_size {ws.group_size}")
    if ws.has_global_scale and global_scale is None:
        global_scale = weight_global_scale([w], ws)
    scale, zero = weight_qparams(w, ws, global_scale)
    rows, cols = w.shape
    z = None if zero is None else ws.layout.expand(zero, rows, cols)
    codes = quantize_codes(w, ws.layout.expand(effective_scale(scale, global_scale), rows, cols), z, ws)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, scheme=scheme, global_scale=global_scale)


def fused_global_scales(layer, graph: LayerGraph, schemes: Mapping[str, Scheme]) -> dict[str, torch.Tensor]:
    """One global scale per set of units vLLM fuses into one matrix (``InputGroup.fused``:
    q/k/v; gate/up) that share a tensor_group scheme, keyed by each unit's name."""
    out: dict[str, torch.Tensor] = {}
    for names in (s for g in graph.groups for s in g.fused):
        by_scheme: dict[Scheme, list[str]] = {}
        for n in names:
            if n in schemes and schemes[n].weights.has_global_scale:
                by_scheme.setdefault(schemes[n], []).append(n)
        for scheme, members in by_scheme.items():
            g = weight_global_scale([graph.unit(n).matrix(layer).detach() for n in members], scheme.weights)
            out.update({n: g for n in members})
    return out


class RTNParams(SchemeParams):
    """Round-to-nearest: the fast baseline every other method must beat. Weight-only int
    (bits/group_size/symmetric) or any preset."""

    method: Literal["rtn"] = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def int_scheme(self, bits: int, group_size: int, symmetric: bool) -> Scheme:
        return weight_only_scheme(bits, group_size, symmetric)


def weight_only_scheme(bits: int, group_size: int, symmetric: bool) -> Scheme:
    """The W{bits}A16 scheme of the weight-only methods; ``group_size`` -1 means per channel."""
    channel = group_size == -1
    return Scheme(WeightScheme(num_bits=bits, symmetric=symmetric, strategy="channel" if channel else "group",
                               group_size=None if channel else group_size))


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    Params = RTNParams

    def __init__(self, params, model_config) -> None:
        super().__init__(params, model_config)
        # only a static activation parameter (NVFP4's input global scale) needs data
        self.needs_calibration = any(observes_inputs(s) for s in self.assignment.schemes)

    def quantize_layer(self, layer, graph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        schemes = self.schemes_or_default(graph, schemes)
        input_globals = observe_input_globals(graph, schemes)
        if input_globals.stats:
            calib.observe(input_globals.stats)
        shared = fused_global_scales(layer, graph, schemes)
        out = {name: quantize_rtn(graph.unit(name).matrix(layer).detach(), s, shared.get(name))
               for name, s in schemes.items()}
        input_globals.apply(out)
        return out
