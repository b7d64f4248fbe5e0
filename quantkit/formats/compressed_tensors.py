"""The compressed-tensors format: what llm-compressor writes and vLLM loads natively.

One Linear scheme maps to one of the library's compressors (compressed-tensors 0.20):
  - int weights, no activations  -> ``pack-quantized``: ``weight_packed`` int32 ``[out, in*b/32]``
    (codes + 2**(b-1), ``k``-th code of a word at bits ``k*b``), ``weight_scale`` in the model
    dtype, ``weight_shape`` int64 ``[2]``, and for asymmetric schemes ``weight_zero_point``
    int32 ``[out*b/32, groups]`` (zero points + 2**(b-1), packed along the *output* dim).
  - int8 weights + int8 activations -> ``int-quantized``: ``weight`` int8, ``weight_scale``,
    ``input_scale`` when static.
  - fp8 weights + fp8 activations -> ``float-quantized``; fp8 weight-only -> ``naive-quantized``
    (the library's own choice for it): ``weight`` float8_e4m3fn, ``weight_scale``,
    ``input_scale`` when static.
W8A8 scales are stored in float32, the dtype vLLM allocates for them
(compressed_tensors_w8a8_int8.py / compressed_tensors_w8a8_fp8.py create float32 scale params).

compressed-tensors 0.20 rejects ``actorder="group"`` (the only mode that stored a g_idx), so
act-order is described as ``actorder="weight"``: columns were visited in activation order but
groups stay contiguous. A weight whose g_idx permutes groups cannot be stored here; the GPTQ
format can store it.
"""

from __future__ import annotations

import torch

from ..errors import ExportError
from ..scheme import ActivationScheme, QuantizedWeight, Scheme
from .base import Format, register_format
from .layout import has_permuted_groups
from .packing import pack_factor, pack_int32, to_unsigned

QUANT_METHOD = "compressed-tensors"
LIBRARY_VERSION = "0.20.0"
"""The compressed-tensors release whose on-disk layout this module writes."""

PACKED_BITS = (4, 8)
"""Weight-only int bit widths vLLM's CompressedTensorsWNA16 accepts (WNA16_SUPPORTED_BITS)."""


def compression_format(scheme: Scheme) -> str:
    """The compressed-tensors ``format`` name for ``scheme`` (assumes it is supported)."""
    ws, act = scheme.weights, scheme.input_activations
    if ws.type == "float":
        return "naive-quantized" if act is None else "float-quantized"
    return "pack-quantized" if act is None else "int-quantized"


def _weights_reason(scheme: Scheme) -> str | None:
    ws, act = scheme.weights, scheme.input_activations
    if ws.type == "float":
        if ws.num_bits != 8:
            return f"float weights must be 8-bit (FP8 E4M3), got {ws.num_bits} bits"
        if not ws.symmetric:
            return "FP8 weights must be symmetric"
        if ws.strategy not in ("channel", "tensor"):
            return f"FP8 weights support strategy 'channel' or 'tensor', not {ws.strategy!r}"
        return None
    if act is None:
        if ws.num_bits not in PACKED_BITS:
            return f"weight-only int quantization supports {PACKED_BITS} bits, got {ws.num_bits}"
        if ws.strategy not in ("group", "channel"):
            return (
                "weight-only int quantization needs strategy 'group' or 'channel' "
                f"(vLLM's Marlin/Machete kernels), not {ws.strategy!r}"
            )
        if ws.actorder == "group":
            return ("act-order with dynamic groups needs a permuting g_idx, which compressed-tensors "
                    ">= 0.20 cannot store (and vLLM no longer serves); set static_groups: true")
        return None
    if ws.num_bits != 8:
        return f"int weights with quantized activations must be 8-bit (W8A8), got {ws.num_bits}"
    if not ws.symmetric:
        return "W8A8 int8 weights must be symmetric (vLLM has no weight zero point for them)"
    if ws.strategy not in ("channel", "tensor"):
        return f"W8A8 int8 weights support strategy 'channel' or 'tensor', not {ws.strategy!r}"
    return None


def _activations_reason(scheme: Scheme) -> str | None:
    ws, act = scheme.weights, scheme.input_activations
    if act is None:
        return None
    if act.type != ws.type:
        return f"{act.type} activations with {ws.type} weights is not a scheme vLLM runs"
    if act.num_bits != 8:
        return f"activations must be 8-bit, got {act.num_bits}"
    if not act.symmetric:
        return "asymmetric activations are not exported (no input zero point is produced)"
    if act.strategy == "token" and not act.dynamic:
        return "per-token activation scales must be dynamic"
    return None


def _weight_args(scheme: Scheme) -> dict:
    ws = scheme.weights
    args = {
        "num_bits": ws.num_bits,
        "type": ws.type,
        "symmetric": ws.symmetric,
        "group_size": ws.group_size if ws.strategy == "group" else None,
        "strategy": ws.strategy,
        "dynamic": False,
    }
    if ws.actorder == "static" and ws.strategy == "group":
        args["actorder"] = "weight"
    return args


def _activation_args(act: ActivationScheme) -> dict:
    return {
        "num_bits": act.num_bits,
        "type": act.type,
        "symmetric": act.symmetric,
        "group_size": None,
        "strategy": act.strategy,
        "dynamic": act.dynamic,
    }


@register_format("compressed-tensors")
class CompressedTensorsFormat(Format):
    """compressed-tensors checkpoints (pack-/int-/float-/naive-quantized)."""

    def unsupported_reason(self, scheme: Scheme) -> str | None:
        return _weights_reason(scheme) or _activations_reason(scheme)

    def kv_cache_reason(self, kv_cache: ActivationScheme | None) -> str | None:
        if kv_cache is None:
            return None
        if kv_cache.type != "float" or kv_cache.num_bits != 8:
            return "only an FP8 (E4M3) KV cache is supported"
        if kv_cache.strategy != "tensor" or kv_cache.dynamic or not kv_cache.symmetric:
            return "the KV cache must use static, symmetric, per-tensor scales (k_scale/v_scale)"
        return None

    def weight_tensors(
        self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        scheme = qw.scheme
        self.require(scheme, prefix)
        fmt = compression_format(scheme)
        if fmt == "pack-quantized":
            return self._packed(prefix, qw, dtype)
        out = {
            f"{prefix}.weight": qw.codes.contiguous(),
            f"{prefix}.weight_scale": qw.scale.to(torch.float32).contiguous(),
        }
        act = scheme.input_activations
        if act is not None and not act.dynamic:
            if qw.input_scale is None:
                raise ExportError(f"{prefix}: static activation scheme but the quantizer gave no input_scale",
                                  file=prefix)
            out[f"{prefix}.input_scale"] = qw.input_scale.to(torch.float32).reshape(1)
        return out

    def _packed(self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        bits = qw.scheme.weights.num_bits
        if has_permuted_groups(qw):
            raise ExportError(
                f"{prefix}: its g_idx permutes quantization groups, which compressed-tensors "
                ">= 0.20 cannot store (actorder='group' was removed)", file=prefix, field="export.format",
                value="compressed-tensors", hint="export with format 'gptq' or quantize with static act-order groups")
        out_f, in_f = qw.shape
        if in_f % pack_factor(bits):
            raise ExportError(f"{prefix}: in_features {in_f} is not a multiple of {32 // bits}", file=prefix,
                              value=in_f)
        tensors = {
            f"{prefix}.weight_packed": pack_int32(to_unsigned(qw.codes, bits), bits, dim=1),
            f"{prefix}.weight_scale": qw.scale.to(dtype).contiguous(),
            f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if qw.zero_point is not None:
            if out_f % pack_factor(bits):
                raise ExportError(f"{prefix}: out_features {out_f} is not a multiple of {32 // bits}, "
                                  "needed to pack asymmetric zero points", file=prefix, value=out_f)
            tensors[f"{prefix}.weight_zero_point"] = pack_int32(
                to_unsigned(qw.zero_point, bits), bits, dim=0
            )
        return tensors

    def quantization_config(
        self, scheme: Scheme, ignore: list[str], kv_cache: ActivationScheme | None = None
    ) -> dict:
        self.require(scheme, "quantization_config", kv_cache)
        fmt = compression_format(scheme)
        act = scheme.input_activations
        group = {
            "targets": ["Linear"],
            "weights": _weight_args(scheme),
            "input_activations": None if act is None else _activation_args(act),
            "output_activations": None,
            "format": fmt,
        }
        return {
            "quant_method": QUANT_METHOD,
            "version": LIBRARY_VERSION,
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(ignore),
            "kv_cache_scheme": None if kv_cache is None else _activation_args(kv_cache),
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }
