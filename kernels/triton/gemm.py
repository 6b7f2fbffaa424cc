"""Triton GEMMs on quantized rows: the int8 tensor-core forward and the fused mask + inverse-rotation backward.

Forward (docs/numerics.md §6): ``y = x̂_h ŵ_hᵀ = (codes_x · codes_wᵀ) ⊙ (step_x/2)(step_w/2)ᵀ`` with an int8
``tl.dot`` and an int32 accumulator (exact for odd codes ≤ ±127) and the steps applied in the epilogue.
Backward (docs/numerics.md §4): ``g_x = IHT(M_x ⊙ (g_y · ŵ_h))`` and ``g_w = IHT(M_w ⊙ (g_yᵀ · x̂_h))``. Both are
one kernel,
``out[r, k] = IHT(M[r, k] · Σ_j G[r, j] · (step[j]/2) · codes[j, k])``: the step multiplies the gradient tile on
load (it varies along the reduction), the codes enter the dot as exact small integers, and the mask bits and the
128×128 Hadamard tile are applied to each 128-wide output block in the epilogue, so ``x_h`` is never stored.
Inputs are :class:`bitlaw.kernels.triton.quant.PackedRows` from :func:`bitlaw.kernels.triton.quant.quantize_rows`.
"""

from __future__ import annotations

import math

import torch

import triton
import triton.language as tl
from bitlaw.kernels.triton.quant import (
    FP32_DOT_PRECISION,
    HADAMARD_BLOCK,
    INTERPRETED,
    PackedRows,
    _configs,
    check_device,
    hadamard_signs,
    load_codes,
    load_mask_bits,
)

OUT_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_out_dtype(out_dtype: torch.dtype) -> torch.dtype:
    # The interpreter truncates fp32 → bf16 where the GPU rounds to nearest even: there the kernels write fp32 and
    # torch rounds, so both runs give the same bf16 numbers.
    return torch.float32 if INTERPRETED else out_dtype


@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in ((128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
                                  (128, 128, 64, 4, 4), (64, 128, 128, 4, 4))],
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2})),
    key=["M", "N", "K", "BITS_X", "FIELD_BITS_X", "BITS_W", "FIELD_BITS_W", "HAS_BIAS"],
)
@triton.jit
def _gemm_kernel(cx_ptr, cw_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, stride_cx, stride_cw, stride_out,
                 BITS_X: tl.constexpr, FIELD_BITS_X: tl.constexpr, BITS_W: tl.constexpr,
                 FIELD_BITS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row tiles share each column tile of codes_w while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = load_codes(cx_ptr, rm[:, None], kk[None, :], (rm[:, None] < M) & (kk[None, :] < K), stride_cx,
                       BITS_X, FIELD_BITS_X)
        b = load_codes(cw_ptr, rn[None, :], kk[:, None], (rn[None, :] < N) & (kk[:, None] < K), stride_cw,
                       BITS_W, FIELD_BITS_W)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    half_sx = 0.5 * tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    half_sw = 0.5 * tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * half_sx[:, None] * half_sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_R": br, "BLOCK_J": bj}, num_warps=w, num_stages=s)
         for br, bj, w, s in ((128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3))],
        triton.Config({"BLOCK_R": 64, "BLOCK_J": 64})),
    key=["R", "J", "K", "BITS", "FIELD_BITS", "ROTATE", "DOT_BF16"],
)
@triton.jit
def _masked_grad_kernel(g_ptr, stride_gr, stride_gj, step_ptr, codes_ptr, stride_codes, mask_ptr, stride_mask,
                        out_ptr, stride_out, R, J, K, inv_sqrt_block,
                        BITS: tl.constexpr, FIELD_BITS: tl.constexpr, ROTATE: tl.constexpr, DOT_BF16: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        g = tl.load(g_ptr + rr[:, None] * stride_gr + jj[None, :] * stride_gj,
                    mask=(rr[:, None] < R) & (jj[None, :] < J), other=0.0).to(tl.float32)
        half_step = 0.5 * tl.load(step_ptr + jj, mask=jj < J, other=0.0)
        g = g * half_step[None, :]
        codes = load_codes(codes_ptr, jj[:, None], kk[None, :], (jj[:, None] < J) & (kk[None, :] < K),
                           stride_codes, BITS, FIELD_BITS)
        if DOT_BF16:
            # Odd codes are exact in bf16; the scaled gradient is rounded once, as a bf16 backward matmul does.
            acc += tl.dot(g.to(tl.bfloat16), codes.to(tl.bfloat16))
        else:
            acc += tl.dot(g, codes.to(tl.float32), input_precision=PRECISION)
    ok = (rr[:, None] < R) & (kk[None, :] < K)
    acc = tl.where(load_mask_bits(mask_ptr, rr[:, None], kk[None, :], ok, stride_mask), acc, 0.0)
    if ROTATE:
        # Inverse rotation of this 128-wide block: H is symmetric and orthonormal, so IHT = · H.
        acc = tl.dot(acc, hadamard_signs(BLOCK_K), input_precision=PRECISION) * inv_sqrt_block
    tl.store(out_ptr + rr[:, None] * stride_out + kk[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _check_pair(a: PackedRows, b: PackedRows, what: str) -> None:
    if a.k != b.k:
        raise ValueError(f"{what}: reduction sizes differ (K={a.k} for the first operand, K={b.k} for the second)")
    if a.rotated != b.rotated:
        raise ValueError(f"{what}: one operand is Hadamard-rotated and the other is not; both must be quantized "
                         "in the same domain")
    check_device(a.step, what)


def quantized_matmul(xq: PackedRows, wq: PackedRows, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y [M, N] = x̂ ŵᵀ (+ bias)`` from quantized rows ``xq`` (``M`` rows) and ``wq`` (``N`` rows) of equal ``K``.

    int8 × int8 → int32 accumulation, then ``acc · (step_x/2) · (step_w/2)`` in fp32 (+ bias) cast to ``out_dtype``
    (fp32 or bf16). ``bias``: ``[N]``, any float dtype.
    """
    _check_pair(xq, wq, "quantized_matmul")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"quantized_matmul: out_dtype={out_dtype} is not allowed; allowed: {OUT_DTYPES}")
    m, n, k = xq.rows, wq.rows, xq.k
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"quantized_matmul: bias has shape {tuple(bias.shape)}, expected ({n},)")
    out = torch.empty(m, n, dtype=_kernel_out_dtype(out_dtype), device=xq.step.device)
    if m and n:
        if k == 0:
            return (out.zero_() + (bias.float() if bias is not None else 0)).to(out_dtype)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm_kernel[grid](xq.codes, wq.codes, xq.step, wq.step, bias if bias is not None else xq.step, out,
                           m, n, k, xq.codes.stride(0), wq.codes.stride(0), out.stride(0),
                           BITS_X=xq.bits, FIELD_BITS_X=xq.field_bits, BITS_W=wq.bits, FIELD_BITS_W=wq.field_bits,
                           HAS_BIAS=bias is not None)
    return out.to(out_dtype)


def masked_rotated_grad(grad: torch.Tensor, coded: PackedRows, masked: PackedRows,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``IHT(M ⊙ (grad · ĉ))`` ``[R, K]``: ``grad`` ``[R, J]`` fp32/bf16 (any strides), ``coded`` ``J`` rows of ``K``
    whose values ``ĉ`` are dequantized on load, ``masked`` the ``R`` rows whose bit mask ``M`` applies.

    The inverse Hadamard rotation is applied when both are rotated. Output in ``out_dtype`` (fp32 or bf16).
    """
    _check_pair(coded, masked, "masked_rotated_grad")
    if grad.dim() != 2 or tuple(grad.shape) != (masked.rows, coded.rows):
        raise ValueError(f"masked_rotated_grad: grad has shape {tuple(grad.shape)}, expected "
                         f"({masked.rows}, {coded.rows}) = (rows of the masked operand, rows of the coded one)")
    if grad.dtype not in OUT_DTYPES:
        raise ValueError(f"masked_rotated_grad: grad dtype {grad.dtype} is not allowed; allowed: {OUT_DTYPES}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"masked_rotated_grad: out_dtype={out_dtype} is not allowed; allowed: {OUT_DTYPES}")
    r, j, k = masked.rows, coded.rows, coded.k
    out = torch.empty(r, k, dtype=_kernel_out_dtype(out_dtype), device=grad.device)
    if r and k:
        if j == 0:
            return out.zero_().to(out_dtype)
        grid = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), triton.cdiv(k, HADAMARD_BLOCK))  # noqa: E731
        _masked_grad_kernel[grid](grad, grad.stride(0), grad.stride(1), coded.step, coded.codes,
                                  coded.codes.stride(0), masked.mask, masked.mask.stride(0), out, out.stride(0),
                                  r, j, k, 1.0 / math.sqrt(HADAMARD_BLOCK), BITS=coded.bits,
                                  FIELD_BITS=coded.field_bits,
                                  ROTATE=coded.rotated, DOT_BF16=grad.dtype == torch.bfloat16 and not INTERPRETED,
                                  PRECISION=FP32_DOT_PRECISION, BLOCK_K=HADAMARD_BLOCK)
    return out.to(out_dtype)


def grad_input(grad_out: torch.Tensor, xq: PackedRows, wq: PackedRows,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``g_x = IHT(M_x ⊙ (g_y · ŵ_h))`` ``[M, K]`` from ``g_y`` ``[M, N]``, the weight codes and the input mask."""
    return masked_rotated_grad(grad_out, wq, xq, out_dtype)


def grad_weight(grad_out: torch.Tensor, xq: PackedRows, wq: PackedRows,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``g_w = IHT(M_w ⊙ (g_yᵀ · x̂_h))`` ``[N, K]`` from ``g_y`` ``[M, N]``, the input codes and the weight mask."""
    return masked_rotated_grad(grad_out.t(), xq, wq, out_dtype)
