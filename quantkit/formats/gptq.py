"""The GPTQ format (``quant_method: gptq``, ``checkpoint_format: gptq``, i.e. "GPTQ v1").

Per Linear of weight ``[out, in]``, ``b`` bits, ``pf = 32 // b``, ``G`` groups:
  - ``qweight`` int32 ``[in/pf, out]``: unsigned codes (signed + 2**(b-1)) packed along the
    *input* dim, input row ``r*pf + k`` of column ``c`` at bits ``k*b`` of ``qweight[r, c]``.
  - ``qzeros`` int32 ``[G, out/pf]``: unsigned zero points **minus one**, packed along the
    output dim the same way. vLLM's gptq.py reads ``checkpoint_format`` (default ``""``) and
    treats anything but ``"gptq_v2"`` as v1, whose kernels add the one back (``gptq_gemm``'s
    ``use_v2_format=False``); AutoGPTQ/GPTQModel write v1 by default. Symmetric weights store
    ``2**(b-1) - 1`` (``0x77777777`` at 4 bits); gptq_marlin ignores qzeros for them (uint4b8).
  - ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]`` (``i // g`` unless act-order).
v1 cannot represent an unsigned zero point of 0 (it would wrap to ``2**b``): such a weight is
refused with a clear error rather than written wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ExportError
from ..scheme import ActivationScheme, QuantizedWeight, Scheme
from .base import Format, ignored_segments, register_format, segment_pattern
from .layout import has_permuted_groups, natural_g_idx
from .packing import pack_factor, pack_int32, to_unsigned

GPTQ_BITS = (4, 8)


@register_format("gptq")
class GPTQFormat(Format):
    """GPTQ v1 checkpoints; vLLM runs symmetric ones with gptq_marlin, asymmetric with gptq."""

    def unsupported_reason(self, scheme: Scheme) -> str | None:
        ws = scheme.weights
        if scheme.input_activations is not None:
            return "GPTQ stores weight-only schemes; activation quantization needs compressed-tensors"
        if ws.type != "int":
            return "GPTQ stores int weights only; FP8 needs compressed-tensors"
        if ws.num_bits not in GPTQ_BITS:
            return f"GPTQ export supports {GPTQ_BITS} bits, got {ws.num_bits}"
        if ws.strategy not in ("group", "channel"):
            return f"GPTQ needs strategy 'group' or 'channel', not {ws.strategy!r}"
        if ws.actorder == "group" and ws.strategy == "group":
            # vLLM >= 0.32 refuses such checkpoints when it parses the config
            # (utils/gptq_utils.py: "GPTQ group activation ordering (desc_act=True) is no longer supported").
            return "act-order with dynamic groups (desc_act: true) is no longer served by vLLM; set static_groups: true"
        return None

    def weight_tensors(
        self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        scheme = qw.scheme
        self.require(scheme, prefix)
        bits = scheme.weights.num_bits
        pf = pack_factor(bits)
        out_f, in_f = qw.shape
        if in_f % pf or out_f % pf:
            raise ExportError(f"{prefix}: GPTQ needs in and out features divisible by {pf}, got {qw.shape}",
                              file=prefix, value=tuple(qw.shape))
        if has_permuted_groups(qw) and scheme.weights.actorder != "group":
            raise ExportError(f"{prefix}: g_idx permutes groups but the scheme has actorder off (desc_act)",
                              file=prefix)
        if qw.zero_point is None:
            zeros = torch.full(qw.scale.shape, 1 << (bits - 1), dtype=torch.int32, device=qw.scale.device)
        else:
            zeros = to_unsigned(qw.zero_point, bits)
            if bool((zeros == 0).any()):
                raise ExportError(
                    f"{prefix}: an asymmetric zero point sits at the lowest code, which GPTQ v1 "
                    "(zeros stored minus one) cannot represent", file=prefix, field="export.format", value="gptq",
                    hint="use compressed-tensors")
        g_idx = natural_g_idx(qw) if qw.g_idx is None else qw.g_idx.to(torch.int32)
        return {
            f"{prefix}.qweight": pack_int32(to_unsigned(qw.codes, bits).t(), bits, dim=0),
            f"{prefix}.qzeros": pack_int32((zeros - 1).t(), bits, dim=1),
            f"{prefix}.scales": qw.scale.reshape(out_f, -1).t().to(torch.float16).contiguous(),
            f"{prefix}.g_idx": g_idx.contiguous(),
        }

    def quantization_config(
        self, schemes: Scheme | Mapping[str, Scheme], ignore: list[str], kv_cache: ActivationScheme | None = None
    ) -> dict:
        scheme = self.single_scheme(schemes)
        self.require(scheme, "quantization_config", kv_cache)
        ws = scheme.weights
        grouped = ws.strategy == "group"
        config = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": ws.num_bits,
            "group_size": ws.group_size if grouped else -1,
            "desc_act": ws.actorder == "group" and grouped,
            "sym": ws.symmetric,
            "lm_head": False,
        }
        # vLLM's GPTQ config skips modules matching a "-:" rule (gptq_utils.get_dynamic_override).
        others = [seg for seg in ignored_segments(ignore) if seg != "lm_head"]
        rules = {"-:" + (seg[3:] if seg.startswith("re:") else segment_pattern(seg)[3:]): {} for seg in others}
        if rules:
            config["dynamic"] = rules
        return config
