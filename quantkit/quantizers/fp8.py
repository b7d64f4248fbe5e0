"""FP8 (E4M3) weights and activations, optionally with static FP8 KV-cache scales.

Weights: ``scale = amax / 448`` per output channel or per tensor, codes are ``w / scale``
cast to float8_e4m3fn (round to nearest even). Activations: dynamic per token, or a static
per-tensor ``input_scale = amax / 448`` from calibration (min-max; Linears sharing an input
share it).

KV cache: ``<attention>.k_scale`` / ``<attention>.v_scale`` are ``amax / 448`` of the key and
value the layer's attention receives over calibration: after the model's own k_norm (Qwen3,
Gemma 3, OLMo 2) and RoPE, which is what vLLM's FP8 cache stores. They are observed with the
float weights in the same calibration pass as the activation scales (the FP8 weights move
each product by at most 2^-4 relative, the norms and RoPE by far more).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import CalibrationError, RecipeError
from ..scheme import FP8_MAX, ActivationScheme, QuantizedWeight, Scheme, WeightScheme
from .base import ATTENTION_KEY, ATTENTION_VALUE, LayerCalibration, Quantizer, QuantizerParams, register_quantizer
from .observers import AbsMax
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

    def quantize_layer(self, layer, graph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        p: FP8Params = self.params  # type: ignore[assignment]
        names = self.schemes_or_default(graph, schemes)
        out = {n: quantize_rtn(graph.unit(n).matrix(layer).detach(), self.scheme) for n in names}
        stats: dict[str, AbsMax] = {}
        if p.activations == "static":
            stats.update({g.key: AbsMax() for g in graph.groups})
        if p.kv_cache:
            stats.update({ATTENTION_KEY: AbsMax(), ATTENTION_VALUE: AbsMax()})
        if stats:
            calib.observe(stats)
        if p.activations == "static":
            for g in graph.groups:
                scale = fp8_scale(stats[g.key].amax).reshape(1)
                for n in g.linears:
                    if n in out:
                        out[n].input_scale = scale.clone()
        self._extra = {}
        if p.kv_cache:
            kv_amax = {role: stats[key].amax for role, key in (("k", ATTENTION_KEY), ("v", ATTENTION_VALUE))}
            if any(a is None for a in kv_amax.values()):
                raise CalibrationError(f"quantization.kv_cache: no attention call reached {graph.layer_class}",
                                       field="quantization.kv_cache", hint="set kv_cache: false")
            attention = _attention_module(graph)
            self._extra = {f"{attention}.{role}_scale": fp8_scale(kv_amax[role]).reshape(()) for role in ("k", "v")}
        return out

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._extra)


def _attention_module(graph) -> str:
    """The module the k/v scales belong to: the parent of the unit holding the key rows
    (``self_attn`` for k_proj as for a fused qkv_proj), where vLLM looks for them."""
    for u in graph.units:
        if "k" in u.roles:
            return u.name.rpartition(".")[0]
    raise RecipeError(f"quantization.kv_cache: {graph.layer_class} has no key projection the layer graph can name",
                      field="quantization.kv_cache", value=True, hint="set kv_cache: false")
