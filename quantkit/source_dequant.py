"""Source checkpoints that ship their own quantization, dequantized as they are read.

DeepSeek-V3/R1 store their Linears as float8_e4m3fn with one ``weight_scale_inv`` per 128x128
block (``quantization_config.weight_block_size``); gpt-oss stores its experts as MXFP4: 4-bit
E2M1 codes two to a byte (``*_blocks`` ``[..., G, 16]``) with one power-of-two scale per 32
values (``*_scales``, an E8M0 exponent biased by 127). quantkit calibrates and quantizes from
the float values these stand for; the tensors that only describe the source's quantization
(scales, blocks) are consumed by the dequantization and never copied to the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

# E2M1 code -> value (sign bit first): the OCP microscaling FP4 table.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``w · scale_inv`` with one scale per ``block`` (rows, columns); edge blocks are
    partial (DeepSeek's 7168 columns are 56 blocks of 128; ``kv_a_proj``'s 576 rows end in one of 64)."""
    out_f, in_f = w.shape
    br, bc = block
    rows = (out_f + br - 1) // br
    cols = (in_f + bc - 1) // bc
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"block scales of shape {tuple(scale_inv.shape)} do not cover a {out_f}x{in_f} weight in "
                         f"{br}x{bc} blocks ({rows}x{cols} expected)")
    s = scale_inv.to(torch.float32).repeat_interleave(br, 0)[:out_f].repeat_interleave(bc, 1)[:, :in_f]
    return w.to(torch.float32) * s


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of MXFP4 ``blocks`` (uint8 ``[..., G, B]``, low nibble first) with E8M0
    ``scales`` (uint8 ``[..., G]``): ``[..., G * 2B]``."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    vals = lut[codes.long()]
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.reshape(*b.shape[:-2], b.shape[-2] * b.shape[-1] * 2)


class DequantizedSource:
    """A ``ModelSource`` whose checkpoint is quantized by its authors, seen as the float
    checkpoint it stands for: ``weight_map`` lists the float tensors (FP8 weights under their
    own names; gpt-oss's ``X_blocks``/``X_scales`` as ``X``), ``tensor`` dequantizes, and the
    scale tensors are gone (consumed, never copied to the output). Everything else is the
    wrapped source's."""

    def __init__(self, source, kind: str, block: tuple[int, int] | None = None):
        self.base, self.kind, self.block = source, kind, block
        # float name -> (codes, scales) source tensors
        self._parts: dict[str, tuple[str, str]] = dequantized_parts(source.weight_map, kind)
        self.weight_map: dict[str, str] = {f: source.weight_map[src]
                                           for f, src in float_sources(source.weight_map, kind).items()}

    @property
    def dequantized(self) -> set[str]:
        """The float tensors this view computes from codes and scales."""
        return set(self._parts)

    def __getattr__(self, attr: str):
        return getattr(self.base, attr)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def reader(self) -> "DequantizingReader":
        return DequantizingReader(self, self.base.reader())

    def tensor(self, name: str) -> torch.Tensor:
        with self.reader() as r:
            return r.tensor(name)

    def tensor_on(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._parts:
            return self.base.tensor_on(name, device, dtype)
        with self.reader() as r:
            return r.to_device(name, device, dtype)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The float32 values of one tensor's codes and scales, on their device."""
        if self.kind == "fp8":
            return dequantize_fp8_blocks(codes, scales, self.block)
        return dequantize_mxfp4(codes, scales).transpose(-1, -2).contiguous()  # as transformers holds them

    def dequantize_as(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``dequantize`` cast to ``dtype``, one expert at a time where the codes hold a whole
        block's experts: a gpt-oss-120b block at once is 2 GB of float32 values and twice that
        in int64 code indices."""
        if not (self.kind == "mxfp4" and codes.dim() > 3):
            return self.dequantize(codes, scales).to(dtype)
        first = self.dequantize(codes[0], scales[0]).to(dtype)
        out = first.new_empty((codes.shape[0], *first.shape))
        out[0] = first
        for e in range(1, codes.shape[0]):
            out[e] = self.dequantize(codes[e], scales[e]).to(dtype)
        return out

    def tensor_location(self, name: str):
        if name not in self._parts:
            return self.base.tensor_location(name)
        path, _, shape, _, _ = self.base.tensor_location(self._parts[name][0])
        return path, "F32", shape, 0, 0  # not a byte range: read (dequantized) and cast when copied


class DequantizingReader:
    """A ``ShardReader`` over a ``DequantizedSource``: the float tensors its codes and scales
    stand for, each shard opened once."""

    def __init__(self, view: DequantizedSource, base):
        self.view, self.base = view, base

    def __enter__(self) -> "DequantizingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.base.close()

    def tensor(self, name: str) -> torch.Tensor:
        """``name`` on the host (float32 where dequantized)."""
        if name not in self.view._parts:
            return self.base.tensor(name)
        codes, scales = (self.base.tensor(n) for n in self.view._parts[name])
        return self.view.dequantize(codes, scales)

    def to_device(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``name`` in ``dtype`` on ``device``, dequantized there: the host holds the codes and
        scales (1 byte a value for FP8, half for MXFP4), never a float32 copy, and the copy to
        the device moves those (a DeepSeek-V3 MoE layer: 11 G values, 45 GB in float32)."""
        if name not in self.view._parts:
            return self.base.to_device(name, device, dtype)
        codes, scales = (self.base.tensor(n).to(device) for n in self.view._parts[name])
        return self.view.dequantize_as(codes, scales, dtype)

    def to_device_all(self, names: list[str], device: torch.device,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``to_device`` of each of ``names``, their source tensors (codes and scales as stored)
        read in one go, each float tensor computed as soon as its parts have arrived: the
        device holds the codes in flight, not a layer's (DeepSeek-V3's: 11 GB)."""
        names = list(dict.fromkeys(names))
        parts = {n: self.view._parts.get(n, (n,)) for n in names}
        wanted_by = {s: n for n, srcs in parts.items() for s in srcs}
        arrived: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        with contextlib.closing(self.base.stream(list(wanted_by), device, None)) as tensors:
            for s, t in tensors:
                arrived[s] = t
                n = wanted_by[s]
                if all(p in arrived for p in parts[n]):
                    got = [arrived.pop(p) for p in parts[n]]
                    out[n] = self.view.dequantize_as(*got, dtype) if n in self.view._parts else \
                        got[0].to(dtype if got[0].is_floating_point() else got[0].dtype)
        return {n: out[n] for n in names}


def dequantized_parts(names: Iterable[str], kind: str) -> dict[str, tuple[str, str]]:
    """Each float tensor a source quantized as ``kind`` ("fp8" or "mxfp4") stands for ->
    its (codes, scales) tensors among ``names``."""
    names = set(names)
    if kind == "fp8":
        return {n: (n, f"{n}_scale_inv") for n in names if n.endswith(".weight") and f"{n}_scale_inv" in names}
    return {n[:-7]: (n, f"{n[:-7]}_scales") for n in names if n.endswith("_blocks") and f"{n[:-7]}_scales" in names}


def float_sources(names: Iterable[str], kind: str) -> dict[str, str]:
    """Each tensor of the float checkpoint a source quantized as ``kind`` stands for -> the
    source tensor it is read from (its codes, or itself); scale tensors are consumed."""
    names = list(names)
    parts = dequantized_parts(names, kind)
    codes = {c: f for f, (c, _) in parts.items()}
    scales = {s for _, s in parts.values()}
    return {codes.get(n, n): n for n in names if n not in scales}


def float_names(names: Iterable[str], quantization_config) -> list[str]:
    """The tensor names of the float checkpoint a source stands for (``names`` when its
    quantization is not one quantkit reads as float): what transformers' conversion mapping
    and the layer graph are matched against, as ``float_view`` reads the checkpoint."""
    kind = quantized_kind(quantization_config)
    return list(names) if kind is None else list(float_sources(names, kind))


def quantized_kind(quantization_config) -> str | None:
    """"fp8" (block scales) or "mxfp4" when the source's own quantization is one quantkit reads
    as float values, else None."""
    qc = quantization_config if isinstance(quantization_config, dict) else {}
    if qc.get("quant_method") == "fp8" and qc.get("weight_block_size"):
        return "fp8"
    return "mxfp4" if qc.get("quant_method") == "mxfp4" else None


def float_view(source):
    """``source`` as a float checkpoint: itself, or a ``DequantizedSource`` when its config
    declares a quantization quantkit reads (FP8 with block scales, MXFP4)."""
    qc = source.config.get("quantization_config") or {}
    kind = quantized_kind(qc)
    if kind is None:
        return source
    return DequantizedSource(source, kind, tuple(qc["weight_block_size"]) if kind == "fp8" else None)
