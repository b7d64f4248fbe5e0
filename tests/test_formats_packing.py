import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from quantkit.formats.packing import (
    pack_awq,
    pack_int32,
    to_signed,
    to_unsigned,
    unpack_awq,
    unpack_int32,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_unpack_round_trip(bits, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 1 << bits, (32, 64), generator=gen, dtype=torch.int32)
    packed = pack_int32(v, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == v.shape[dim] * bits // 32
    assert torch.equal(unpack_int32(packed, bits, dim), v)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_compressed_tensors_library(bits, dim):
    gen = torch.Generator().manual_seed(bits + dim)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (16, 64), generator=gen).to(torch.int8)
    ours = pack_int32(to_unsigned(signed, bits), bits, dim)
    assert torch.equal(ours, pack_to_int32(signed, bits, packed_dim=dim))
    assert torch.equal(to_signed(unpack_int32(ours, bits, dim), bits), signed)


def test_bit_order_is_least_significant_first():
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int32)
    assert pack_int32(v, 4, 1).item() == 0xF7654321 - 2**32  # int32 of bit pattern 0xF7654321
    assert unpack_int32(torch.tensor([[0x76543210]], dtype=torch.int32), 4, 1).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_awq_order():
    cols = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    # slot k holds column [0, 2, 4, 6, 1, 3, 5, 7][k]: nibbles from the lowest are 0,2,4,6,1,3,5,7
    assert pack_awq(cols).item() == 0x75316420
    assert torch.equal(unpack_awq(pack_awq(cols)), cols)


def test_out_of_range_values_are_refused():
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4, 1)
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(1, 6, dtype=torch.int32), 4, 1)
