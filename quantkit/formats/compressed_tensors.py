"""The compressed-tensors format: what llm-compressor writes and vLLM loads natively.

One Linear scheme maps to one of the library's compressors (compressed-tensors 0.20):
  - int weights, no activations  -> ``pack-quantized``: ``weight_packed`` int32 ``[out, in*b/32]``
    (codes + 2**(b-1), ``k``-th code of a word at bits ``k*b``), ``weight_scale`` in the model
    dtype, ``weight_shape`` int64 ``[2]``, and for asymmetric schemes ``weight_zero_point``
    int32 ``[out*b/32, groups]`` (zero points + 2**(b-1), packed along the *output* dim).
    W4AFP8 (int4 + FP8 activations) is stored the same way: vLLM's CompressedTensorsW4A8Fp8
    reads ``weight_packed`` (the library itself would infer int-quantized for it).
  - int8 weights + int8 activations -> ``int-quantized``: ``weight`` int8, ``weight_scale``,
    ``input_scale`` when static. W4A8 (int4 + int8 activations) too, codes in int8 and scales
    in the model dtype (what vLLM's CompressedTensorsW4A8Int allocates).
  - fp8 weights + fp8 activations -> ``float-quantized``; fp8 weight-only -> ``naive-quantized``
    (the library's own choice for it): ``weight`` float8_e4m3fn, ``weight_scale`` (per channel,
    tensor, or ``[ceil(out/b), ceil(in/b)]`` for 128x128 blocks), ``input_scale`` when static.
  - NVFP4 -> ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in/2]`` (two E2M1
    codes a byte, even column in the low nibble; sign bit 3), ``weight_scale``
    float8_e4m3fn ``[out, in/16]``, ``weight_global_scale`` float32 ``[1]`` (a divisor:
    ``w = q * s / g``), and for W4A4 ``input_global_scale`` float32 ``[1]``.
  - MXFP4 -> ``mxfp4-pack-quantized``: ``weight_packed`` as NVFP4, ``weight_scale`` uint8
    ``[out, in/32]`` holding E8M0 exponents (``s = 2**(e - 127)``).
W8A8 and FP8 scales are stored in float32, the dtype vLLM allocates for them
(compressed_tensors_w8a8_int8.py / compressed_tensors_w8a8_fp8.py create float32 scale params).

A mixed recipe writes one config group per distinct scheme: the most common one targets
``Linear``, the others list their modules by full name, which every loader gives precedence
over a class target (compressed-tensors' ``match_targets`` orders exact names first, vLLM's
``find_matched_target`` tries names before classes); Linears left in float are listed in
``ignore``. transformers' ``dequantize=True`` load path decompresses every dense module with
one group (``get_dense_scheme``), so mixed checkpoints load in transformers the default way
(compressed modules, decompressed module by module with their own group).

compressed-tensors 0.20 rejects ``actorder="group"`` (the only mode that stored a g_idx), so
act-order is described as ``actorder="weight"``: columns were visited in activation order but
groups stay contiguous. A weight whose g_idx permutes groups cannot be stored here; the GPTQ
format can store it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ExportError
from ..grids import E8M0_EXP_RANGE, FP8_DTYPE
from ..scheme import ActivationScheme, QuantizedWeight, Scheme
from .base import Format, register_format, scheme_groups
from .layout import has_permuted_groups
from .packing import pack_factor, pack_fp4, pack_int32, to_unsigned

QUANT_METHOD = "compressed-tensors"
LIBRARY_VERSION = "0.20.0"
"""The compressed-tensors release whose on-disk layout this module writes."""

PACKED_BITS = (4, 8)
"""Weight-only int bit widths vLLM's CompressedTensorsWNA16 accepts (WNA16_SUPPORTED_BITS)."""
W4AFP8_GROUP = 128
"""vLLM's only W4A8-FP8 kernel (CUTLASS, Hopper) takes group 128 alone
(CompressedTensorsW4A8Fp8.__init__ raises otherwise)."""
MIXED = "mixed-precision"


def is_nvfp4(scheme: Scheme) -> bool:
    ws = scheme.weights
    return (ws.type, ws.num_bits, ws.strategy, ws.group_size, ws.scale_format) == ("float", 4, "tensor_group", 16, "e4m3")


def is_mxfp4(scheme: Scheme) -> bool:
    ws = scheme.weights
    return (ws.type, ws.num_bits, ws.strategy, ws.group_size, ws.scale_format) == ("float", 4, "group", 32, "e8m0")


def compression_format(scheme: Scheme) -> str:
    """The compressed-tensors ``format`` name for ``scheme`` (assumes it is supported)."""
    ws, act = scheme.weights, scheme.input_activations
    if ws.type == "float":
        if ws.num_bits == 4:
            return "nvfp4-pack-quantized" if is_nvfp4(scheme) else "mxfp4-pack-quantized"
        return "naive-quantized" if act is None else "float-quantized"
    if act is None or act.type == "float":
        return "pack-quantized"
    return "int-quantized"


def _fp4_reason(scheme: Scheme) -> str | None:
    act = scheme.input_activations
    if not (is_nvfp4(scheme) or is_mxfp4(scheme)):
        return ("FP4 weights are NVFP4 (tensor groups of 16, E4M3 scales, a global scale) or MXFP4 "
                "(groups of 32, E8M0 scales)")
    if not scheme.weights.symmetric:
        return "FP4 weights must be symmetric"
    if act is None:
        return None
    nvfp4_acts = (act.type, act.num_bits, act.strategy, act.group_size, act.dynamic, act.scale_format) == (
        "float", 4, "tensor_group", 16, True, "e4m3")
    if is_nvfp4(scheme) and nvfp4_acts:
        return None
    return "FP4 weights take NVFP4 activations (NVFP4 W4A4) or none; vLLM has no other FP4 scheme here"


def _weights_reason(scheme: Scheme) -> str | None:
    ws, act = scheme.weights, scheme.input_activations
    if ws.type == "float":
        if ws.num_bits == 4:
            return _fp4_reason(scheme)
        if ws.num_bits != 8:
            return f"float weights must be FP8 (E4M3) or FP4 (E2M1), got {ws.num_bits} bits"
        if not ws.symmetric:
            return "FP8 weights must be symmetric"
        if ws.strategy not in ("channel", "tensor", "block"):
            return f"FP8 weights support strategy 'channel', 'tensor' or 'block', not {ws.strategy!r}"
        if ws.strategy == "block" and act is not None and (act.strategy, act.group_size) != ("group", ws.block_size[1]):
            return "FP8 block weights take activations in dynamic per-token groups as wide as the block"
        return None
    if ws.scale_format != "float" or ws.strategy in ("block", "tensor_group"):
        return f"int weights take plain float scales per channel or group, not {ws.strategy}/{ws.scale_format}"
    if act is None:
        if ws.num_bits not in PACKED_BITS:
            return f"weight-only int quantization supports {PACKED_BITS} bits, got {ws.num_bits}"
        if ws.strategy not in ("group", "channel"):
            return (
                "weight-only int quantization needs strategy 'group' or 'channel' "
                f"(vLLM's Marlin/Machete kernels), not {ws.strategy!r}"
            )
        return None
    if ws.num_bits == 4:
        if not ws.symmetric:
            return "W4A8 int4 weights must be symmetric (vLLM's W4A8 kernels have no weight zero point)"
        if ws.strategy not in ("group", "channel"):
            return f"W4A8 int4 weights need strategy 'group' or 'channel', not {ws.strategy!r}"
        if act.type == "float" and (ws.strategy, ws.group_size) != ("group", W4AFP8_GROUP):
            return f"W4AFP8 needs group_size {W4AFP8_GROUP}: vLLM's CUTLASS W4A8 kernel takes no other"
        return None
    if ws.num_bits != 8:
        return f"int weights with quantized activations must be 8-bit (W8A8) or 4-bit (W4A8), got {ws.num_bits}"
    if not ws.symmetric:
        return "W8A8 int8 weights must be symmetric (vLLM has no weight zero point for them)"
    if ws.strategy not in ("channel", "tensor"):
        return f"W8A8 int8 weights support strategy 'channel' or 'tensor', not {ws.strategy!r}"
    return None


def _activations_reason(scheme: Scheme) -> str | None:
    ws, act = scheme.weights, scheme.input_activations
    if act is None or ws.num_bits == 4 and ws.type == "float":  # FP4 activations: _fp4_reason
        return None
    if ws.num_bits == 4 and (act.num_bits, act.strategy, act.dynamic) != (8, "token", True):
        return "W4A8 takes 8-bit activations quantized per token at run time"
    if act.type != ws.type and ws.num_bits != 4:
        return f"{act.type} activations with {ws.type} weights is not a scheme vLLM runs"
    if act.num_bits != 8:
        return f"activations must be 8-bit, got {act.num_bits}"
    if not act.symmetric:
        return "asymmetric activations are not exported (no input zero point is produced)"
    if act.strategy == "token" and not act.dynamic:
        return "per-token activation scales must be dynamic"
    if act.strategy == "group" and not (act.dynamic and ws.strategy == "block"):
        return "per-token-group activations go with FP8 block weights and are dynamic"
    if act.strategy == "tensor_group":
        return "tensor-group activations are NVFP4 and go with NVFP4 weights"
    return None


def _actorder_reason(scheme: Scheme) -> str | None:
    if scheme.weights.actorder == "group":
        return ("act-order with dynamic groups needs a permuting g_idx, which compressed-tensors "
                ">= 0.20 cannot store (and vLLM no longer serves); set static_groups: true")
    return None


_SCALE_DTYPE = {"e4m3": "torch.float8_e4m3fn", "e8m0": "torch.uint8"}


def _weight_args(scheme: Scheme) -> dict:
    ws = scheme.weights
    args = {
        "num_bits": ws.num_bits,
        "type": ws.type,
        "symmetric": ws.symmetric,
        "group_size": ws.group_size if ws.strategy in ("group", "tensor_group") else None,
        "strategy": ws.strategy,
        "dynamic": False,
    }
    if ws.strategy == "block":
        args["block_structure"] = list(ws.block_size)
    if ws.scale_format in _SCALE_DTYPE:
        args["scale_dtype"] = _SCALE_DTYPE[ws.scale_format]
    if ws.actorder == "static" and ws.strategy == "group":
        args["actorder"] = "weight"
    return args


def _activation_args(act: ActivationScheme) -> dict:
    args = {
        "num_bits": act.num_bits,
        "type": act.type,
        "symmetric": act.symmetric,
        "group_size": act.group_size if act.strategy in ("group", "tensor_group") else None,
        "strategy": act.strategy,
        # tensor groups: scales per token group at run time, global scale from calibration
        "dynamic": "local" if act.has_global_scale else act.dynamic,
    }
    if act.scale_format in _SCALE_DTYPE:
        args["scale_dtype"] = _SCALE_DTYPE[act.scale_format]
    return args


def config_group(scheme: Scheme, targets: list[str]) -> dict:
    """One entry of ``config_groups``: a QuantizationScheme as compressed-tensors dumps it."""
    act = scheme.input_activations
    return {
        "targets": targets,
        "weights": _weight_args(scheme),
        "input_activations": None if act is None else _activation_args(act),
        "output_activations": None,
        "format": compression_format(scheme),
    }


@register_format("compressed-tensors")
class CompressedTensorsFormat(Format):
    """compressed-tensors checkpoints (pack-/int-/float-/naive-quantized, NVFP4, MXFP4), mixed
    schemes included."""

    mixed_schemes = True

    def unsupported_reason(self, scheme: Scheme) -> str | None:
        return _weights_reason(scheme) or _activations_reason(scheme) or _actorder_reason(scheme)

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
        if fmt.endswith("fp4-pack-quantized"):
            return self._fp4(prefix, qw)
        small_int = scheme.weights.type == "int" and scheme.weights.num_bits < 8
        out = {
            f"{prefix}.weight": qw.codes.contiguous(),
            f"{prefix}.weight_scale": qw.scale.to(dtype if small_int else torch.float32).contiguous(),
        }
        act = scheme.input_activations
        if act is not None and not act.dynamic:
            if qw.input_scale is None:
                raise ExportError(f"{prefix}: static activation scheme but the quantizer gave no input_scale",
                                  file=prefix)
            out[f"{prefix}.input_scale"] = qw.input_scale.to(torch.float32).reshape(1)
        return out

    def _fp4(self, prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        if qw.shape[1] % 2:
            raise ExportError(f"{prefix}: FP4 packs two codes a byte; in_features {qw.shape[1]} is odd", file=prefix,
                              value=qw.shape[1])
        out = {f"{prefix}.weight_packed": pack_fp4(qw.codes)}
        if is_mxfp4(qw.scheme):
            exponent = torch.log2(qw.scale.to(torch.float32)).round().clamp(*E8M0_EXP_RANGE)
            out[f"{prefix}.weight_scale"] = (exponent + 127).to(torch.uint8)
            return out
        if qw.global_scale is None:
            raise ExportError(f"{prefix}: NVFP4 weight without its global scale", file=prefix)
        out[f"{prefix}.weight_scale"] = qw.scale.to(FP8_DTYPE)
        out[f"{prefix}.weight_global_scale"] = qw.global_scale.to(torch.float32).reshape(1)
        if qw.scheme.input_activations is not None:
            if qw.input_global_scale is None:
                raise ExportError(f"{prefix}: NVFP4 W4A4 but the quantizer gave no input_global_scale", file=prefix)
            out[f"{prefix}.input_global_scale"] = qw.input_global_scale.to(torch.float32).reshape(1)
        return out

    def stacks(self, scheme: Scheme) -> bool:
        return self.unsupported_reason(scheme) is None and compression_format(scheme) == "pack-quantized"

    def stacked_tensors(self, prefixes: list[str], stack: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self._packed_fields(prefixes[0], stack, dtype)

    def _packed(self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{field}": t for field, t in self._packed_fields(prefix, qw, dtype).items()}

    def _packed_fields(self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The pack-quantized tensors by field; ``qw`` is one Linear or a stack of them (every
        tensor with a leading dim), and each field keeps the leading dims."""
        bits = qw.scheme.weights.num_bits
        if has_permuted_groups(qw):
            raise ExportError(
                f"{prefix}: its g_idx permutes quantization groups, which compressed-tensors "
                ">= 0.20 cannot store (actorder='group' was removed)", file=prefix, field="export.format",
                value="compressed-tensors", hint="export with format 'gptq' or quantize with static act-order groups")
        *lead, out_f, in_f = qw.codes.shape
        if in_f % pack_factor(bits):
            raise ExportError(f"{prefix}: in_features {in_f} is not a multiple of {32 // bits}", file=prefix,
                              value=in_f)
        tensors = {
            "weight_packed": pack_int32(to_unsigned(qw.codes, bits), bits, dim=-1),
            "weight_scale": qw.scale.to(dtype).contiguous(),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64).expand(*lead, 2),
        }
        if qw.zero_point is not None:
            if out_f % pack_factor(bits):
                raise ExportError(f"{prefix}: out_features {out_f} is not a multiple of {32 // bits}, "
                                  "needed to pack asymmetric zero points", file=prefix, value=out_f)
            tensors["weight_zero_point"] = pack_int32(to_unsigned(qw.zero_point, bits), bits, dim=-2)
        return tensors

    def quantization_config(
        self, schemes: Scheme | Mapping[str, Scheme], ignore: list[str], kv_cache: ActivationScheme | None = None
    ) -> dict:
        groups = scheme_groups(schemes)
        for scheme in groups:
            self.require(scheme, "quantization_config", kv_cache)
        # The most common scheme (the first one on a tie) targets every Linear by class, listed
        # last: compressed-tensors' matcher stops at a module's first matching target when it
        # notes which targets matched, and would warn that the named ones matched nothing.
        default = max(groups, key=lambda s: len(groups[s]))
        named = [config_group(s, sorted(names)) for s, names in groups.items() if s != default]
        config_groups = {f"group_{i}": g for i, g in enumerate([*named, config_group(default, ["Linear"])])}
        formats = {g["format"] for g in config_groups.values()}
        return {
            "quant_method": QUANT_METHOD,
            "version": LIBRARY_VERSION,
            "format": formats.pop() if len(formats) == 1 else MIXED,
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": list(ignore),
            "kv_cache_scheme": None if kv_cache is None else _activation_args(kv_cache),
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }
