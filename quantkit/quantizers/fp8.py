"""FP8 (E4M3) weights and activations, optionally with static FP8 KV-cache scales.

Weights: ``scale = amax / 448`` per output channel or per tensor, codes are ``w / scale``
cast to float8_e4m3fn (round to nearest even). Activations: dynamic per token, or a static
per-tensor ``input_scale = amax / 448`` from calibration (min-max; Linears sharing an input
share it).

KV cache: ``self_attn.k_scale`` / ``self_attn.v_scale`` are ``amax / 448`` of the k_proj and
v_proj outputs over calibration, computed with the FP8-dequantized weights the server will
use. vLLM scales the key *after* RoPE; observing k_proj's output is the usual approximation
(RoPE rotates pairs of channels, so per-token norms are kept but a channel's max may move).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..scheme import FP8_MAX, ActivationScheme, QuantizedWeight, Scheme, WeightScheme
from .base import LayerCalibration, Quantizer, QuantizerParams, register_quantizer
from .observers import minmax_amax
from .rtn import quantize_rtn

K_PROJ, V_PROJ = "self_attn.k_proj", "self_attn.v_proj"
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

    def quantize_layer(self, layer, arch, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        p: FP8Params = self.params  # type: ignore[assignment]
        names = self.schemes_or_default(arch, schemes)
        out = {n: quantize_rtn(layer.get_submodule(n).weight.data, self.scheme) for n in names}
        hooks = {}
        act_amax: dict[str, torch.Tensor] = {}
        if p.activations == "static":
            for g in arch.groups:
                hooks[g.linears[0]] = _running_max(act_amax, g.linears[0], lambda x: x)
        kv_amax: dict[str, torch.Tensor] = {}
        if p.kv_cache:
            # k_proj and v_proj read the same input; observe their outputs from that input.
            first = next(g.linears[0] for g in arch.groups if K_PROJ in g.linears)
            projs = {}
            for name in (K_PROJ, V_PROJ):
                lin = layer.get_submodule(name)
                w = out[name].dequantize(torch.float32) if name in out else lin.weight.data.float()
                projs[name] = (w, None if lin.bias is None else lin.bias.float())

            def kv_hook(x: torch.Tensor, prev=hooks.get(first)) -> None:
                if prev is not None:
                    prev(x)
                xf = x.to(torch.float32)
                for name, (w, b) in projs.items():
                    m = minmax_amax(F.linear(xf, w, b))
                    kv_amax[name] = m if name not in kv_amax else torch.maximum(kv_amax[name], m)

            hooks[first] = kv_hook
        if hooks:
            calib.run(hooks)
        if p.activations == "static":
            for g in arch.groups:
                scale = fp8_scale(act_amax[g.linears[0]]).reshape(1)
                for n in g.linears:
                    if n in out:
                        out[n].input_scale = scale.clone()
        self._extra = {}
        if p.kv_cache:
            self._extra = {
                "self_attn.k_scale": fp8_scale(kv_amax[K_PROJ]).reshape(()),
                "self_attn.v_scale": fp8_scale(kv_amax[V_PROJ]).reshape(()),
            }
        return out

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._extra)


def _running_max(store: dict, key: str, fn):
    def hook(x: torch.Tensor) -> None:
        m = minmax_amax(fn(x))
        store[key] = m if key not in store else torch.maximum(store[key], m)

    return hook
