"""FP8 (E4M3) weights and activations, optionally with static FP8 KV-cache scales.

Weights: ``scale = amax / 448`` per output channel or per tensor, codes are ``w / scale``
cast to float8_e4m3fn (round to nearest even). Activations: dynamic per token, or a static
per-tensor ``input_scale = amax / 448`` from calibration (min-max; Linears sharing an input
share it).

KV cache: ``<attention>.k_scale`` / ``<attention>.v_scale`` are ``amax / 448`` of the key and
value rows' outputs (the units the layer graph gives roles k and v: k_proj and v_proj, or the
row slices of a fused qkv_proj) over calibration, computed with the FP8-dequantized weights
the server will use. vLLM scales the key *after* RoPE; observing the projection's output is
the usual approximation (RoPE rotates pairs of channels, so per-token norms are kept but a
channel's max may move).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..scheme import FP8_MAX, ActivationScheme, QuantizedWeight, Scheme, WeightScheme
from .base import LayerCalibration, Quantizer, QuantizerParams, register_quantizer
from .observers import minmax_amax
from .rtn import quantize_rtn

_TINY = 1e-12


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` as float32 (a scale of at least 1e-12)."""
    return (amax.to(torch.float32) / FP8_MAX).clamp_min(_TINY)


class FP8Params(QuantizerParams):
    method: Literal["fp8"] = "fp8"
    weight_strategy: Literal["channel", "tensor"] = "channel"
    activations: Literal["dynamic", "static"] = "dynamic"
    kv_cache: bool = False

    def scheme(self) -> Scheme:
        dynamic = self.activations == "dynamic"
        return Scheme(
            WeightScheme(num_bits=8, type="float", symmetric=True, strategy=self.weight_strategy, group_size=None),
            ActivationScheme(8, "float", True, "token" if dynamic else "tensor", dynamic=dynamic),
        )

    def kv_cache_scheme(self) -> ActivationScheme | None:
        return ActivationScheme(8, "float", True, "tensor", dynamic=False) if self.kv_cache else None


@register_quantizer("fp8")
class FP8Quantizer(Quantizer):
    Params = FP8Params

    def __init__(self, params, model_config) -> None:
        super().__init__(params, model_config)
        self.needs_calibration = params.activations == "static" or params.kv_cache
        self._extra: dict[str, torch.Tensor] = {}

    def quantize_layer(self, layer, graph, calib: LayerCalibration) -> dict[str, QuantizedWeight]:
        p: FP8Params = self.params  # type: ignore[assignment]
        out = {u.name: quantize_rtn(u.matrix(layer).detach(), self.scheme) for u in graph.units}
        hooks = {}
        act_amax: dict[str, torch.Tensor] = {}
        if p.activations == "static":
            for g in graph.groups:
                hooks[g.key] = _running_max(act_amax, g.key, lambda x: x)
        kv_amax: dict[str, torch.Tensor] = {}
        kv = _kv_rows(graph) if p.kv_cache else {}
        for role, (unit, a, b) in kv.items():
            key = graph.group_of(unit.name).key
            bias = layer.get_submodule(unit.name).bias
            w = out[unit.name].dequantize(torch.float32)[a:b]
            bb = None if bias is None else bias.float()[a:b]

            def kv_hook(x: torch.Tensor, prev=hooks.get(key), role=role, w=w, bb=bb) -> None:
                if prev is not None:
                    prev(x)
                m = minmax_amax(F.linear(x.to(torch.float32), w, bb))
                kv_amax[role] = m if role not in kv_amax else torch.maximum(kv_amax[role], m)

            hooks[key] = kv_hook
        if hooks:
            calib.run(hooks)
        if p.activations == "static":
            for g in graph.groups:
                scale = fp8_scale(act_amax[g.key]).reshape(1)
                for n in g.linears:
                    out[n].input_scale = scale.clone()
        self._extra = {}
        if kv:
            attention = kv["k"][0].name.rpartition(".")[0]
            self._extra = {f"{attention}.{role}_scale": fp8_scale(kv_amax[role]).reshape(()) for role in ("k", "v")}
        return out

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._extra)


def _kv_rows(graph) -> dict[str, tuple]:
    """The unit and row range holding the key and the value projection: ``{"k": (unit, a, b),
    "v": ...}``."""
    found = {}
    for u in graph.units:
        for seg in u.segments:
            if seg.role in ("k", "v"):
                found[seg.role] = (u, seg.start, seg.end)
    if set(found) != {"k", "v"}:
        from ..errors import RecipeError

        raise RecipeError(f"quantization.kv_cache: {graph.layer_class} has no key/value projection the layer "
                          "graph can name", field="quantization.kv_cache", value=True,
                          hint="set kv_cache: false")
    return found


def _running_max(store: dict, key: str, fn):
    def hook(x: torch.Tensor) -> None:
        m = minmax_amax(fn(x))
        store[key] = m if key not in store else torch.maximum(store[key], m)

    return hook
