"""The backward of the fused quantized linear: cuBLAS for both GEMMs, two small memory-bound Triton passes around them.

docs/numerics.md §4: ``g_x = IHT(M_x ⊙ (g_y · ŵ_h))`` and ``g_w = IHT(M_w ⊙ (g_yᵀ · x̂_h))``. Two thirds of a
linear layer's FLOPs are these two products of 16-bit operands (the output gradient is not quantized), so they
run on ``torch.matmul`` (cuBLAS), the fastest code for them there is. Around each one:

- :func:`dequantize_rows` turns saved packed codes back into the quantized values, in the gradient's dtype: one
  read of the packed codes, one write of a 16-bit tensor (the same operand ``nn.Linear`` would have saved);
- :func:`masked_rotate` applies the trust mask and the inverse block Hadamard to the GEMM's output in one pass:
  one read, one write; the ``·H`` is a tensor-core dot against the ±1 matrix, exact products in bf16.

The static profile (bitlaw.benchmarks.profile) shows why this beats the earlier fused kernel that dequantized codes
inside its K-loop and rotated in its epilogue: that loop issued about twice the instructions its tensor-core
work needed and its grid re-read the output gradient once per 128 columns, while cuBLAS needs neither.
"""

from __future__ import annotations

import math

import torch

import triton
import triton.language as tl

from .common import (
    HADAMARD_BLOCK,
    INTERPRETED,
    capability,
    check_device,
    dot_mode,
    dot_signs,
    pick,
    signs_for,
    unpack_block,
)
from .quant import QuantizedRows


def pass_launch(capability: int, dot: int = 1) -> tuple[int, int]:
    """(rows per program, warps) of the two passes (one 128-column block per program; fixed, memory-bound) on a GPU of
    ``capability``, for a rotation by ``dot`` (:func:`~bitlaw.kernels.triton.common.dot_mode`). Hopper: 64 rows on 4
    warps (wgmma reads the ±1 matrix from shared memory). Older GPUs, whose mma.sync holds it in registers: 64 rows
    on 8 warps (4 would spill), and 32 rows on 4 warps for fp32 gradients, whose three bf16 parts per value spill at
    64 rows once the unit column stride is specialized (bitlaw.benchmarks.profile)."""
    if capability >= 90:
        return 64, 4
    return (32, 4) if dot == 2 else (64, 8)


OUT_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _dequantize_kernel(packed_ptr, step_ptr, signs_ptr, out_ptr, R, K, stride_packed, stride_out, inv_sqrt_block,
                       BITS: tl.constexpr, FIELD_BITS: tl.constexpr, ROTATE: tl.constexpr, EVEN_K: tl.constexpr,
                       DOT: tl.constexpr, BLOCK_R: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    WIDTH: tl.constexpr = BLOCK_K * FIELD_BITS // 8
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    byte_cols = k0 * FIELD_BITS // 8 + tl.arange(0, WIDTH)
    packed_rows = packed_ptr + rows.to(tl.int64)[:, None] * stride_packed
    if EVEN_K:  # whole blocks: no column mask, so the loads stay 16-byte vectors
        fields = tl.load(packed_rows + byte_cols[None, :], mask=row_ok[:, None], other=0)
    else:
        fields = tl.load(packed_rows + byte_cols[None, :],
                         mask=row_ok[:, None] & (byte_cols < tl.cdiv(K * FIELD_BITS, 8))[None, :], other=0)
    codes = 2 * unpack_block(fields, FIELD_BITS, BLOCK_R, BLOCK_K) - (2**BITS - 1)
    half_step = 0.5 * tl.load(step_ptr + rows, mask=row_ok, other=0.0)
    if ROTATE:
        # Odd codes ≤ 127 and ±1 are exact in bf16 and their sums (< 2^15) exact in fp32: the rotation is exact.
        signs = tl.load(signs_ptr + tl.arange(0, BLOCK_K)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :])
        values = dot_signs(codes, signs, tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32), DOT)
        values = values * (half_step * inv_sqrt_block)[:, None]
    else:
        values = codes.to(tl.float32) * half_step[:, None]
    if EVEN_K:
        ok = row_ok[:, None]
    else:
        ok = row_ok[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], values.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _masked_rotate_kernel(g_ptr, stride_gr, stride_gk, mask_ptr, stride_mask, signs_ptr, out_ptr, stride_out, R, K,
                          inv_sqrt_block, ROTATE: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    HALF: tl.constexpr = 64
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        ok = row_ok[:, None]
    else:
        ok = row_ok[:, None] & (cols < K)[None, :]
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gr
    mask_rows = mask_ptr + rows.to(tl.int64)[:, None] * stride_mask
    if ROTATE and DOT == 2:
        # fp32 gradients: the block multiplied in two halves of 64 columns (rows of H), so that the three bf16
        # parts of a half stay in registers (whole blocks would spill). Rotated blocks are always whole.
        half = tl.arange(0, HALF)
        out = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for part in tl.static_range(2):
            g = tl.load(g_rows + (k0 + part * HALF + half)[None, :] * stride_gk, mask=row_ok[:, None], other=0.0)
            bytes_ = tl.load(mask_rows + (k0 // 8 + part * (HALF // 8) + tl.arange(0, HALF // 8))[None, :],
                             mask=row_ok[:, None], other=0)
            keep = unpack_block(bytes_, 1, BLOCK_R, HALF) != 0
            signs = tl.load(signs_ptr + (part * HALF + half)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :])
            out = dot_signs(tl.where(keep, g, 0.0), signs, out, DOT)
        out = out * inv_sqrt_block
    else:
        g = tl.load(g_rows + cols[None, :] * stride_gk, mask=ok, other=0.0)
        mask_cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        if EVEN_K:
            bytes_ = tl.load(mask_rows + mask_cols[None, :], mask=row_ok[:, None], other=0)
        else:
            bytes_ = tl.load(mask_rows + mask_cols[None, :],
                             mask=row_ok[:, None] & (mask_cols < tl.cdiv(K, 8))[None, :], other=0)
        keep = unpack_block(bytes_, 1, BLOCK_R, BLOCK_K) != 0
        if ROTATE:
            signs = tl.load(signs_ptr + tl.arange(0, BLOCK_K)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :])
            # Masked values times ±1: exact products, fp32 sums, one rounding at the store.
            out = dot_signs(tl.where(keep, g, 0.0), signs, tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32), DOT)
            out = out * inv_sqrt_block
        else:
            out = tl.where(keep, g.to(tl.float32), 0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok)


def _pass_grid(rows: int, k: int, block_r: int) -> tuple[int, int]:
    return triton.cdiv(rows, block_r), triton.cdiv(k, HADAMARD_BLOCK)


def dequantize_rows(rows: QuantizedRows, dtype: torch.dtype = torch.float32, unrotate: bool = False) -> torch.Tensor:
    """Values ``[R, K]`` in ``dtype`` (fp32 or bf16) from the packed codes of ``rows``: ``(2q+1)·step/2``, rotated back
    to the original domain when ``unrotate`` and ``rows.rotated``."""
    if rows.packed is None:
        raise ValueError("dequantize_rows: the rows hold no packed codes (quantize_rows(..., packed=True))")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_rows: dtype={dtype} is not allowed; allowed: {OUT_DTYPES}")
    check_device(rows.step, "dequantize_rows")
    r, k = rows.rows, rows.k
    out = torch.empty(r, k, dtype=torch.float32 if INTERPRETED else dtype, device=rows.step.device)
    if r and k:
        rotate = unrotate and rows.rotated
        # Codes ≤ 127 are exact in bf16 and their ±1 sums (< 2^15) exact in fp32: bf16 dots give exact rotations.
        dot = dot_mode(torch.bfloat16)
        signs = signs_for(dot, rows.step.device)
        block_r, warps = pass_launch(capability(rows.step.device), dot)
        _dequantize_kernel[_pass_grid(r, k, block_r)](rows.packed, rows.step, signs, out, r, k,
                                                      rows.packed.stride(0), out.stride(0),
                                                      1.0 / math.sqrt(HADAMARD_BLOCK), BITS=rows.bits,
                                                      FIELD_BITS=rows.field_bits, ROTATE=rotate,
                                                      EVEN_K=k % 128 == 0, DOT=dot, BLOCK_R=block_r,
                                                      num_warps=pick(warps, 4))
    return out.to(dtype)


def masked_rotate(grad: torch.Tensor, masked: QuantizedRows, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``IHT(M ⊙ grad)`` ``[R, K]`` in ``out_dtype``: ``grad`` ``[R, K]`` fp32/bf16 (any strides), ``M`` the bit mask of
    ``masked`` (``R`` rows of ``K``); the inverse Hadamard only when ``masked.rotated``."""
    if grad.dim() != 2 or tuple(grad.shape) != (masked.rows, masked.k):
        raise ValueError(f"masked_rotate: grad has shape {tuple(grad.shape)}, expected ({masked.rows}, {masked.k}) "
                         "(the rows and K of the masked operand)")
    if grad.dtype not in OUT_DTYPES:
        raise ValueError(f"masked_rotate: grad dtype {grad.dtype} is not allowed; allowed: {OUT_DTYPES}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"masked_rotate: out_dtype={out_dtype} is not allowed; allowed: {OUT_DTYPES}")
    check_device(grad, "masked_rotate")
    r, k = grad.shape
    out = torch.empty(r, k, dtype=torch.float32 if INTERPRETED else out_dtype, device=grad.device)
    if r and k:
        dot = dot_mode(grad.dtype)
        signs = signs_for(dot, grad.device)
        block_r, warps = pass_launch(capability(grad.device), dot)
        _masked_rotate_kernel[_pass_grid(r, k, block_r)](grad, grad.stride(0), grad.stride(1), masked.mask,
                                                         masked.mask.stride(0), signs, out, out.stride(0), r, k,
                                                         1.0 / math.sqrt(HADAMARD_BLOCK), ROTATE=masked.rotated,
                                                         EVEN_K=k % 128 == 0, DOT=dot, BLOCK_R=block_r,
                                                         num_warps=pick(warps, 4))
    return out.to(out_dtype)


def grad_input(grad_out: torch.Tensor, xq: QuantizedRows, wq: QuantizedRows,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``g_x = IHT(M_x ⊙ (g_y · ŵ_h))`` ``[M, K]`` from ``g_y`` ``[M, N]`` (fp32/bf16), the weight's packed codes and
    the input's mask. The GEMM runs in ``g_y``'s dtype on ``torch.matmul``."""
    w_hat = dequantize_rows(wq, grad_out.dtype)
    return masked_rotate(torch.matmul(grad_out, w_hat), xq, out_dtype)


def grad_weight(grad_out: torch.Tensor, xq: QuantizedRows, wq: QuantizedRows,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``g_w = IHT(M_w ⊙ (g_yᵀ · x̂_h))`` ``[N, K]`` from ``g_y`` ``[M, N]``, the input's packed codes and the weight's
    mask. The GEMM runs in ``g_y``'s dtype on ``torch.matmul``."""
    x_hat = dequantize_rows(xq, grad_out.dtype)
    return masked_rotate(torch.matmul(grad_out.t(), x_hat), wq, out_dtype)
