"""Orthonormal Sylvester Hadamard matrices and the block Hadamard transform along the last dimension.

QuEST rotates each row of a weight or activation by ``blockdiag(H, ..., H)`` with ``H`` the Sylvester
Hadamard matrix of size ``block`` scaled by ``1/sqrt(block)``. ``H`` is symmetric and orthonormal
(``H @ H = I``), so the same transform is its own inverse.
"""

from __future__ import annotations

import functools
import math

import torch

DEFAULT_BLOCK = 128


def check_block(block: int) -> None:
    """Raise ValueError unless ``block`` is a power of two >= 1."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or block & (block - 1):
        raise ValueError(f"hadamard block={block!r}: must be a power of two (1, 2, 4, …, 128, 256, …)")


@functools.cache
def _sylvester(n: int) -> torch.Tensor:
    # Built in float64 by doubling, [[H, H], [H, -H]], then scaled once so every entry is exactly ±1/sqrt(n).
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two): ``[n, n]``, symmetric, ``H @ H = I``.

    Equal to ``scipy.linalg.hadamard(n) / sqrt(n)``.
    """
    check_block(n)
    return _sylvester(n).to(device=device, dtype=dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The rotation runs in fp32 at least: a bf16 H is only orthogonal to ~1e-4 (docs/numerics.md §3); float64
    # stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_hadamard(x: torch.Tensor, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Rotate ``x`` (``[..., K]``) by ``blockdiag(H_block, ...)`` along the last dimension.

    Computed in fp32 (float64 for float64 input) and returned in that compute dtype, ``[..., K]``.
    ``K`` must be a multiple of ``block``. The transform is its own inverse (see :func:`inverse_block_hadamard`).
    """
    check_block(block)
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"hadamard block={block} does not divide the last dimension {k} of a tensor of shape "
                         f"{tuple(x.shape)}: in_features must be a multiple of the block")
    dtype = _compute_dtype(x.dtype)
    h = hadamard_matrix(block, dtype=dtype, device=x.device)
    blocks = x.to(dtype).reshape(*x.shape[:-1], k // block, block)
    # Under bf16 autocast the matmul would silently run in bf16; the rotation must stay in fp32.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return (blocks @ h).reshape(x.shape)


def inverse_block_hadamard(x: torch.Tensor, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Inverse of :func:`block_hadamard` (identical, since ``H`` is symmetric and orthonormal)."""
    return block_hadamard(x, block)
