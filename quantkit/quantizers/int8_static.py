"""W8A8 int8 with a static per-tensor activation scale per Linear, from calibration.

Linears sharing an input (q/k/v; gate/up) share one observer and so one input scale, which
is also what vLLM fuses them with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..scheme import ActivationScheme, QuantizedWeight, Scheme
from .base import LayerCalibration, Quantizer, register_quantizer
from .int8_dynamic import INT8_CHANNEL, W8A8Params, quantize_w8a8_layer
from .observers import TensorObserver, int_scale


class StaticInt8Params(W8A8Params):
    method: Literal["static_int8"] = "static_int8"
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(99.99, gt=0.0, le=100.0)

    def scheme(self) -> Scheme:
        return Scheme(INT8_CHANNEL, ActivationScheme(8, "int", True, "tensor", dynamic=False))


@register_quantizer("static_int8")
class StaticInt8Quantizer(Quantizer):
    Params = StaticInt8Params

    def quantize_layer(self, layer, graph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        p: StaticInt8Params = self.params  # type: ignore[assignment]
        names = self.schemes_or_default(graph, schemes)
        observers = {g.key: TensorObserver(p.observer, p.percentile, generator=calib.generator(g.key))
                     for g in graph.groups}
        weights, _ = quantize_w8a8_layer(
            layer, graph, calib, p, self.scheme, observe=lambda: dict(observers), names=names,
        )
        for g in graph.groups:
            scale = int_scale(observers[g.key].amax())
            for n in g.linears:
                if n in weights:
                    weights[n].input_scale = scale.clone()
        return weights
