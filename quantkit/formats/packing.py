"""Pure bit-packing of integer codes into int32 words, shared by every format.

Codes here are *unsigned* (``0 .. 2**bits - 1``); ``to_unsigned``/``to_signed`` move between
them and the signed codes ``QuantizedWeight`` keeps. A word holds ``32 // bits`` codes, the
``k``-th code of a run at bits ``k*bits .. k*bits + bits - 1`` (least significant first): the
order of compressed-tensors, GPTQ and, after AWQ's interleave, AWQ.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Slot ``k`` of an AWQ word holds column ``AWQ_PACK_ORDER[k]`` of its block of eight."""

AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Inverse of ``AWQ_PACK_ORDER``: column ``j`` sits in slot ``AWQ_UNPACK_ORDER[j]``."""


def pack_factor(bits: int) -> int:
    if bits <= 0 or 32 % bits:
        raise ValueError(f"cannot pack {bits}-bit codes into int32 words: 32 is not a multiple")
    return 32 // bits


def to_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[-2**(b-1), 2**(b-1))`` as unsigned int32 codes ``[0, 2**b)``."""
    return codes.to(torch.int32).add_(1 << (bits - 1))


def to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[0, 2**b)`` back to signed int8 codes."""
    return (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit ``values`` along ``dim`` (its size a multiple of 32 // bits).

    Codes of up to 8 bits are combined into bytes (uint8 arithmetic, a quarter of int32's memory
    traffic), and each four bytes read as one little-endian int32 word: byte ``j`` holds codes
    ``j * 8 // bits ...``, so code ``k`` of the word sits at bits ``k * bits``, as the formats
    require. Wider codes are shifted and summed in int32 (their bits are disjoint: no carries)."""
    pf = pack_factor(bits)
    if values.numel():
        lo, hi = torch.aminmax(values)
        if bool((lo < 0) | (hi >= (1 << bits))):
            raise ValueError(f"values out of the unsigned {bits}-bit range [0, {(1 << bits) - 1}]")
    v = values.movedim(dim, -1)
    n = v.shape[-1]
    if n % pf:
        raise ValueError(f"dimension {dim} has {n} codes, not a multiple of {pf}")
    if not v.numel():  # no bytes to read as words
        return torch.zeros(*v.shape[:-1], n // pf, dtype=torch.int32, device=v.device).movedim(-1, dim).contiguous()
    if bits > 8:
        v = v.to(torch.int32).reshape(*v.shape[:-1], n // pf, pf)
        shifts = torch.arange(pf, dtype=torch.int32, device=v.device) * bits
        return (v << shifts).sum(-1, dtype=torch.int32).movedim(-1, dim).contiguous()
    per_byte = 8 // bits
    v = v.to(torch.uint8).reshape(*v.shape[:-1], n // per_byte, per_byte)
    packed = v[..., 0].clone()
    for k in range(1, per_byte):
        packed |= v[..., k] << (k * bits)
    return packed.contiguous().view(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: unsigned int32 codes, ``dim`` grown by ``32 // bits``."""
    if packed.dtype != torch.int32:
        raise ValueError(f"expected int32 words, got {packed.dtype}")
    pf = pack_factor(bits)
    w = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(pf, dtype=torch.int64, device=w.device) * bits
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    v = v.reshape(*w.shape[:-1], w.shape[-1] * pf)
    return v.to(torch.int32).movedim(-1, dim).contiguous()


def awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """Reorder each block of eight columns (last dim) into AWQ's slot order."""
    n = values.shape[-1]
    if n % 8:
        raise ValueError(f"AWQ packs columns in blocks of 8; got {n}")
    blocks = values.reshape(*values.shape[:-1], n // 8, 8)
    return blocks[..., list(AWQ_PACK_ORDER)].reshape(values.shape)


def awq_deinterleave(values: torch.Tensor) -> torch.Tensor:
    """Inverse of ``awq_interleave``."""
    n = values.shape[-1]
    blocks = values.reshape(*values.shape[:-1], n // 8, 8)
    return blocks[..., list(AWQ_UNPACK_ORDER)].reshape(values.shape)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit ``[rows, cols]`` -> AWQ int32 ``[rows, cols // 8]``."""
    return pack_int32(awq_interleave(values), 4, dim=-1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 ``[rows, cols // 8]`` -> unsigned 4-bit ``[rows, cols]``."""
    return awq_deinterleave(unpack_int32(packed, 4, dim=-1))


E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""E2M1 values by their 3-bit magnitude code; bit 3 of a nibble is the sign."""


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``[rows, cols]`` (any float dtype, on the grid) -> uint8 ``[rows, cols/2]``,
    column ``2k`` in the low nibble of byte ``k`` (compressed-tensors' ``pack_fp4_to_uint8``)."""
    v = values.to(torch.float32)
    table = torch.tensor(E2M1_MAGNITUDES, device=v.device)
    mag = torch.searchsorted(table, v.abs().contiguous())
    if v.numel() and not torch.equal(table[mag.clamp_max(7)], v.abs()):
        raise ValueError("values are not all on the E2M1 grid")
    nibble = mag.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)
    rows, cols = nibble.shape
    if cols % 2:
        raise ValueError(f"FP4 packs pairs of columns; got {cols}")
    pairs = nibble.reshape(rows, cols // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``: float32 E2M1 values ``[rows, 2 * cols]``."""
    table = torch.tensor(E2M1_MAGNITUDES, device=packed.device)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    values = table[(nibbles & 7).long()]
    return torch.where((nibbles & 8).bool(), -values, values)
