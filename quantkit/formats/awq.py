"""The AutoAWQ GEMM format (``quant_method: awq``, ``version: gemm``).

Per Linear of weight ``[out, in]`` with group size ``g`` (4-bit, asymmetric only):
  - ``qweight`` int32 ``[in, out/8]``: unsigned codes (signed + 8) of the transposed weight,
    each word holding eight consecutive output columns in AWQ's slot order
    ``[0, 2, 4, 6, 1, 3, 5, 7]`` (vLLM's cpu_wna16.py undoes it with ``(0, 4, 1, 5, 2, 6, 3, 7)``).
  - ``qzeros`` int32 ``[in/g, out/8]``: unsigned zero points (signed + 8), same packing.
    AWQ stores the zero itself: ``w = (q - z) * s`` with no offset (awq_marlin.py passes them
    to Marlin as plain ``uint4`` zero points; cpu_wna16.py reads them unchanged).
  - ``scales`` float16 ``[in/g, out]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ExportError
from ..scheme import ActivationScheme, QuantizedWeight, Scheme
from .base import Format, ignored_segments, register_format
from .layout import has_permuted_groups
from .packing import pack_awq, to_unsigned


@register_format("awq")
class AWQFormat(Format):
    """AutoAWQ GEMM checkpoints; vLLM runs them with awq_marlin on GPU and cpu_awq on CPU."""

    def unsupported_reason(self, scheme: Scheme) -> str | None:
        ws = scheme.weights
        if scheme.input_activations is not None:
            return "AWQ stores weight-only schemes; activation quantization needs compressed-tensors"
        if ws.type != "int" or ws.num_bits != 4:
            return f"AWQ stores 4-bit int weights only, got {ws.num_bits}-bit {ws.type}"
        if ws.symmetric:
            return "AWQ stores asymmetric weights only (zero_point: true); use symmetric=false or gptq/compressed-tensors"
        if ws.strategy != "group" or not ws.group_size:
            return f"AWQ needs group quantization, not strategy {ws.strategy!r}"
        if ws.actorder:
            return "AWQ cannot store act-order (no g_idx); use gptq or compressed-tensors"
        return None

    def weight_tensors(
        self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        self.require(qw.scheme, prefix)
        if has_permuted_groups(qw):
            raise ExportError(f"{prefix}: AWQ cannot store a g_idx that permutes groups", file=prefix)
        out_f, _ = qw.shape
        if out_f % 8:
            raise ExportError(f"{prefix}: AWQ needs out_features divisible by 8, got {out_f}", file=prefix,
                              value=out_f)
        assert qw.zero_point is not None  # asymmetric by unsupported_reason
        return {
            f"{prefix}.qweight": pack_awq(to_unsigned(qw.codes, 4).t()),
            f"{prefix}.qzeros": pack_awq(to_unsigned(qw.zero_point, 4).t()),
            f"{prefix}.scales": qw.scale.t().to(torch.float16).contiguous(),
        }

    def quantization_config(
        self, schemes: Scheme | Mapping[str, Scheme], ignore: list[str], kv_cache: ActivationScheme | None = None
    ) -> dict:
        scheme = self.single_scheme(schemes)
        self.require(scheme, "quantization_config", kv_cache)
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "group_size": scheme.weights.group_size,
            "zero_point": True,
            "modules_to_not_convert": ignored_segments(ignore) or None,
        }
