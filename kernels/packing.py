"""Bit-field packing shared by the kernels' saved tensors and the native export: one layout, defined once.

``bits``-wide fields (``bits`` ∈ {1, 2, 4, 8}) are packed ``8 // bits`` to a byte, first element in the low bits:
field ``j`` of byte ``i`` holds element ``i · (8 // bits) + j``. A row of ``K`` fields takes ``ceil(K·bits/8)``
bytes; the padding of the last byte is zero.
"""

from __future__ import annotations

import torch

FIELD_BITS = (1, 2, 4, 8)


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
