"""Source checkpoints quantized by their authors, dequantized on read (issue 16): DeepSeek-V3's
FP8 with 128x128 block scales and gpt-oss's MXFP4 experts, against float64 references."""

from __future__ import annotations

import pytest
import torch
from quantkit.source_dequant import FP4_VALUES, dequantize_fp8_blocks, dequantize_mxfp4


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])  # whole blocks; partial edge blocks
def test_fp8_block_dequantization(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows, cols = (shape[0] + 127) // 128, (shape[1] + 127) // 128
    scale = torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 0.01 + 1e-3
    codes = torch.empty(shape, dtype=torch.float8_e4m3fn)
    want = torch.empty(shape, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            codes[blk] = (w[blk] / scale[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
            want[blk] = codes[blk].to(torch.float64) * scale[i, j]
    got = dequantize_fp8_blocks(codes, scale.to(torch.float32), (128, 128))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        dequantize_fp8_blocks(codes, scale[:, :1].float(), (128, 128))


def test_mxfp4_dequantization():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 5, 4), generator=gen, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 5, 4 * 32)
    want = torch.empty(3, 5, 128, dtype=torch.float64)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (3, 5, 4, 16))).tolist():
        a, b, g, k = idx
        byte = int(blocks[a, b, g, k])
        s = 2.0 ** (int(scales[a, b, g]) - 127)
        want[a, b, g * 32 + 2 * k] = FP4_VALUES[byte & 0xF] * s
        want[a, b, g * 32 + 2 * k + 1] = FP4_VALUES[byte >> 4] * s
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0)
    # transformers' own reading of gpt-oss experts is the same values, transposed to [E, in, out]
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    torch.testing.assert_close(theirs, got.transpose(1, 2), rtol=0, atol=0)
