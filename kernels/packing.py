"""Bit-field packing of quantized values: one storage rule and one encoding, shared by the kernels' saved codes and
masks and by every export (docs/numerics.md §6).

**Encoding.** A quantized element is stored as the index of its level in ``Format.levels`` (ascending), an
unsigned integer in ``[0, n_levels)``. For ``int{b}`` the level index is ``q + 2^(b−1)`` and the odd integer code
the GEMMs multiply is ``2·index − (2^b − 1)`` (:func:`index_to_code`); a boolean mask is the index of a two-level
grid (0 or 1).

**Width.** Fields are ``field_bits(n_levels)`` ∈ {1, 2, 4, 8} bits wide, packed ``8 // field_bits`` to a byte,
first element in the low bits: field ``j`` of byte ``i`` holds element ``i · (8 // field_bits) + j``. A row of ``K``
fields takes ``ceil(K · field_bits / 8)`` bytes; the padding of the last byte is zero.
"""

from __future__ import annotations

import torch

FIELD_BITS = (1, 2, 4, 8)


def field_bits(n_levels: int) -> int:
    """Bits per stored element for a grid of ``n_levels`` levels: the smallest of 1, 2, 4, 8 that holds them.

    2 levels → 1, ≤ 4 → 2, ≤ 16 → 4, ≤ 256 → 8 (int3 takes 4-bit fields: widths divide a byte so that a row of
    codes can be addressed without straddling bytes).
    """
    if not isinstance(n_levels, int) or not 1 <= n_levels <= 256:
        raise ValueError(f"n_levels={n_levels!r} is not allowed; allowed: 1 to 256 levels")
    return next(bits for bits in FIELD_BITS if n_levels <= 2**bits)


def _check_bits(bits: int) -> None:
    if bits not in FIELD_BITS:
        raise ValueError(f"bits={bits!r} is not allowed; allowed: {', '.join(map(str, FIELD_BITS))}")


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``[..., K]`` in ``[0, 2^bits)`` → uint8 ``[..., ceil(K·bits/8)]``."""
    _check_bits(bits)
    per_byte = 8 // bits
    k = fields.shape[-1]
    padded = torch.nn.functional.pad(fields.to(torch.int32), (0, -k % per_byte))
    groups = padded.reshape(*fields.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=fields.device, dtype=torch.int32) * bits
    return (groups << shifts).sum(dim=-1).to(torch.uint8)


def unpack_fields(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: int64 ``[..., k]`` in ``[0, 2^bits)``."""
    _check_bits(bits)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :k].long()


def code_to_index(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Odd codes ``2q+1`` of ``int{bits}`` (any integer dtype) → level indices ``q + 2^(bits−1)`` (int64)."""
    return (codes.long() + (2**bits - 1)) // 2


def index_to_code(index: torch.Tensor, bits: int) -> torch.Tensor:
    """Level indices of ``int{bits}`` → odd codes ``2·index − (2^bits − 1)`` (int64)."""
    return 2 * index.long() - (2**bits - 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Odd codes ``[..., K]`` of ``int{bits}`` → uint8 ``[..., ceil(K·w/8)]`` of level-index fields, ``w =
    field_bits(2^bits)``. Raises ValueError when a code is not an odd integer of that grid."""
    if codes.numel():
        low, high = int(codes.min()), int(codes.max())
        if low < -(2**bits - 1) or high > 2**bits - 1 or not bool(((codes.long() % 2) == 1).all()):
            raise ValueError(f"pack_codes: codes in [{low}, {high}] are not odd integers of int{bits} "
                             f"(allowed: ±1, ±3, …, ±{2**bits - 1})")
    return pack_fields(code_to_index(codes, bits), field_bits(2**bits))


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 odd codes ``[..., k]`` (``bits`` ≤ 7, so they fit int8)."""
    return index_to_code(unpack_fields(packed, field_bits(2**bits), k), bits).to(torch.int8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., K]`` → uint8 ``[..., ceil(K/8)]`` (bit ``j`` of byte ``i`` is element ``8i + j``)."""
    return pack_fields(mask.to(torch.int32), 1)


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: bool ``[..., k]``."""
    return unpack_fields(packed, 1, k).bool()
