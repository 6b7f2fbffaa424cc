"""The one storage encoding: level-index bit fields, their width rule and the odd-code mapping."""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.formats import get_format
from bitlaw.kernels.packing import (
    code_to_index,
    field_bits,
    index_to_code,
    pack_codes,
    pack_fields,
    pack_mask,
    unpack_codes,
    unpack_fields,
    unpack_mask,
)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fields_round_trip(bits):
    index = torch.randint(0, 2**bits, (5, 37), generator=torch.Generator().manual_seed(bits))
    packed = pack_fields(index, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_fields(packed, bits, 37), index)


def test_field_width_rule():
    assert [field_bits(n) for n in (1, 2, 3, 4, 5, 8, 15, 16, 17, 256)] == [1, 1, 2, 2, 4, 4, 4, 4, 8, 8]
    assert field_bits(len(get_format("int3").levels)) == 4 and field_bits(len(get_format("fp4_e2m1").levels)) == 4
    with pytest.raises(ValueError, match="n_levels=257 is not allowed"):
        field_bits(257)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7])
def test_codes_are_level_indices(bits):
    fmt = get_format(f"int{bits}")
    codes = torch.arange(-(2**bits - 1), 2**bits, 2)
    index = code_to_index(codes, bits)
    # The index of a code is the position of its level in Format.levels (ascending).
    levels = torch.tensor(fmt.levels, dtype=torch.float64)
    assert torch.equal(levels[index], codes.double() / (2**bits - 1))
    assert torch.equal(index_to_code(index, bits), codes)
    odd = codes[torch.randint(0, len(codes), (3, 45), generator=torch.Generator().manual_seed(bits))]
    assert torch.equal(unpack_codes(pack_codes(odd, bits), bits, 45), odd.to(torch.int8))


def test_byte_layout():
    # int4 codes (1, −1, −15, 15) are levels (8, 7, 0, 15); element 2i sits in the low nibble.
    assert pack_codes(torch.tensor([[1, -1, -15, 15]]), 4).tolist() == [[0x78, 0xF0]]
    mask = torch.tensor([[True, False, False, True, False, False, False, False, True, True]])
    assert pack_mask(mask).tolist() == [[0b00001001, 0b00000011]]
    assert torch.equal(unpack_mask(pack_mask(mask), 10), mask)
    with pytest.raises(ValueError, match=r"codes in \[-1, 17\] are not odd integers of int4"):
        pack_codes(torch.tensor([17, -1]), 4)
    with pytest.raises(ValueError, match="not odd integers of int4"):
        pack_codes(torch.tensor([2]), 4)
