"""W8A8 int8 with dynamic per-token activation scales (nothing about activations is
calibrated), plus the weight pipeline the static variant shares.

Weights: int8, per output channel, symmetric, by RTN or by GPTQ (channel-wise). Optional
SmoothQuant folds activation outliers into the weights first.
"""

from __future__ import annotations

from typing import Callable, Literal

from pydantic import Field

from ..scheme import ActivationScheme, QuantizedWeight, Scheme, WeightScheme
from .base import LayerCalibration, Quantizer, QuantizerParams, register_quantizer
from .gptq import collect_hessians, gptq_layer, hessians_to_owners, solve_parts
from .rtn import quantize_rtn
from .smoothquant import smooth_layer

INT8_CHANNEL = WeightScheme(num_bits=8, type="int", symmetric=True, strategy="channel", group_size=None)


class W8A8Params(QuantizerParams):
    """Fields both int8 W8A8 methods share."""

    weight_method: Literal["rtn", "gptq"] = "rtn"
    smoothquant_alpha: float | None = Field(None, ge=0.0, le=1.0)
    # Used only with weight_method: gptq.
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)
    act_order: bool = False

    def folds_input_scales(self) -> bool:
        return self.smoothquant_alpha is not None


class DynamicInt8Params(W8A8Params):
    method: Literal["dynamic_int8"] = "dynamic_int8"

    def scheme(self) -> Scheme:
        return Scheme(INT8_CHANNEL, ActivationScheme(8, "int", True, "token", dynamic=True))


def quantize_w8a8_layer(
    layer,
    graph,
    calib: LayerCalibration,
    params: W8A8Params,
    scheme: Scheme,
    observe: Callable[[], dict] | None = None,
    names=None,
) -> tuple[dict[str, QuantizedWeight], dict]:
    """Smooth (optional), then one calibration pass for whatever is still needed (GPTQ
    Hessians and ``observe()``'s statistics, keyed by Linear name), then quantize the weights.

    ``observe`` returns fresh statistics; it is called after smoothing so they see the
    smoothed activations. Returns the weights of ``names`` (default: every Linear) and those
    statistics (reduced over the ranks).
    """
    names = list(graph.linears if names is None else names)
    if params.smoothquant_alpha is not None:
        smooth_layer(layer, graph, calib, params.smoothquant_alpha)
    stats = observe() if observe is not None else {}
    observed = dict(stats)
    accs = None
    schemes = {n: scheme for n in names}
    if params.weight_method == "gptq":
        accs, stats = collect_hessians(graph, stats)
        parts = solve_parts(layer, graph, accs, schemes, calib.world, calib.expert_owner)
        hessians_to_owners(parts, calib.world, accs)
    if stats:
        calib.observe(stats)
    if accs is not None:
        weights = gptq_layer(
            layer, graph, accs, schemes, calib.world, parts=parts,
            block_size=params.block_size, dampening_frac=params.dampening_frac, act_order=params.act_order,
        )
    else:
        weights = {n: quantize_rtn(graph.unit(n).matrix(layer).detach(), scheme) for n in names}
    return weights, observed


@register_quantizer("dynamic_int8")
class DynamicInt8Quantizer(Quantizer):
    Params = DynamicInt8Params

    def __init__(self, params, model_config) -> None:
        super().__init__(params, model_config)
        self.needs_calibration = params.weight_method == "gptq" or params.smoothquant_alpha is not None

    def quantize_layer(self, layer, graph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        names = self.schemes_or_default(graph, schemes)
        weights, _ = quantize_w8a8_layer(layer, graph, calib, self.params, self.scheme, names=names)
        return weights
