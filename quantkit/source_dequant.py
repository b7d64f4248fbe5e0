"""Source checkpoints that ship their own quantization, dequantized as they are read.

DeepSeek-V3/R1 store their Linears as float8_e4m3fn with one ``weight_scale_inv`` per 128x128
block (``quantization_config.weight_block_size``); gpt-oss stores its experts as MXFP4: 4-bit
E2M1 codes two to a byte (``*_blocks`` ``[..., G, 16]``) with one power-of-two scale per 32
values (``*_scales``, an E8M0 exponent biased by 127). quantkit calibrates and quantizes from
the float values these stand for; the tensors that only describe the source's quantization
(scales, blocks) are consumed by the dequantization and never copied to the output.
"""

from __future__ import annotations

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
