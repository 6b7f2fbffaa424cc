"""The quantized backward: int8 / fp8 output gradients, 8-bit tensor-core GEMMs against the saved codes.

docs/numerics.md §8 and :mod:`bitlaw.kernels.gradients` (the reference) define the numbers. Three kernels:

- :func:`quantize_gradient`: one read of ``g_y`` ``[M, N]`` in tiles of 128 × 128, writing what either GEMM needs:
  for ``grad_input`` ``Q(g_y · u_w)`` ``[M, N]`` with one scale per token per 128 channels, for ``grad_weight``
  ``Q(g_y · u_x)ᵀ`` ``[N, M]`` with one scale per channel per 128 tokens (``u`` = half the other operand's step, the
  fold that lets its codes enter the GEMM exactly). Rounding: nearest or stochastic, the uniform numbers from the
  counter-based generator of :func:`bitlaw.kernels.gradients.uniform_pair` (one 32-bit hash per entry of ``g_y``,
  16 bits for each GEMM), so kernel and reference draw the same bits.
- :func:`transposed_codes`: the saved packed codes of a role as int8 odd codes, transposed (``[K, R]``), so that
  both GEMM operands are contiguous along the reduced dimension (the layout 8-bit wgmma reads).
- :func:`block_scaled_gemm`: ``out = IHT(M ⊙ Σ_blocks s_b · (A_b · B_bᵀ))``: per 128-deep block an int8 dot with an
  int32 accumulator (exact), scaled by the block's per-row scale into an fp32 accumulator; in the epilogue the
  trust mask and the inverse Hadamard rotation (a dot against the ±1 matrix).

Supported: ``int8`` against codes of up to 7 bits, ``scale: block`` with block 128, no gradient rotation. The fp8
formats run the reference: Triton's interpreter cannot convert to fp8, so an fp8 kernel could not be tested here.
"""

from __future__ import annotations

import math

import torch

import triton
import triton.language as tl

from ..gradients import seed_key
from ..recipe import GradSpec
from .common import (
    HADAMARD_BLOCK,
    INTERPRETED,
    MAX_BITS,
    capability,
    check_device,
    dot_mode,
    dot_signs,
    pick,
    signs_for,
    unpack_block,
)
from .quant import QuantizedRows

TILE = 128  # the scale block and the rotation block: one 128-deep slice of the reduced dimension per scale
# Tiles of the GEMM per generation: (BLOCK_M, warps, stages). BLOCK_N is one Hadamard block (the epilogue rotates
# whole tiles) and BLOCK_K one scale block.
GEMM_LAUNCH = {90: (128, 8, 3), 80: (64, 4, 3)}
QUANT_WARPS = 8  # 128 × 128 tiles: 64 entries per thread, no spills; 16 warps issue more (the static profile)


def unsupported_reason(spec: GradSpec, bits: int, role: str) -> str | None:
    """Why the kernels cannot run ``spec`` against ``bits``-bit codes (None when they can)."""
    if not spec.quantized:
        return None
    if spec.format != "int8":
        return f"{role}: gradient format {spec.format!r} runs only on the reference path (the kernels implement int8)"
    if bits > MAX_BITS:
        return f"{role}: {bits}-bit codes do not fit int8 (the kernels take up to {MAX_BITS} bits)"
    if spec.scale != "block" or spec.block != TILE:
        return f"{role}: scale {spec.scale!r} block {spec.block} (the kernels implement scale 'block', block {TILE})"
    if spec.hadamard:
        return f"{role}: hadamard (the rotated gradient runs only on the reference path)"
    return None


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _round(v, bits16, STOCHASTIC: tl.constexpr):
    """``v`` (fp32, scaled into ±127 up to float rounding) onto the int8 grid: ``floor(v + ξ)``, ``ξ = (bits16 +
    ½)·2^-16`` or ½ (nearest), capped at 127. The floor can reach −128, which int8 holds, only when the scale's
    rounding puts ``v`` a few ulps below −127 (docs/numerics.md §8); one integer cap is all the clamping needed,
    and the floor folds into the conversion."""
    if STOCHASTIC:
        shift = (bits16.to(tl.float32) + 0.5) * 1.52587890625e-05  # 2^-16
    else:
        shift = 0.5
    return tl.minimum(tl.floor(v + shift).to(tl.int32), 127).to(tl.int8)


@triton.jit
def _quantize_grad_kernel(g_ptr, stride_gm, stride_gn, unit_in_ptr, unit_w_ptr, qin_ptr, sin_ptr, qw_ptr, sw_ptr,
                          M, N, key, DO_IN: tl.constexpr, DO_W: tl.constexpr, SR_IN: tl.constexpr,
                          SR_W: tl.constexpr):
    BLOCK: tl.constexpr = 128
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn, mask=ok,
                other=0.0).to(tl.float32)
    tiny = 1.1754943508222875e-38
    bits = tl.zeros([BLOCK, BLOCK], dtype=tl.uint32)
    if SR_IN or SR_W:  # one hash per entry of g_y: its high half for grad_input, its low half for grad_weight
        # The counter m·N + n + key (mod 2^32): the key joins each row's base, one add per entry.
        bits = _hash32((rows * N + key).to(tl.uint32)[:, None] + cols.to(tl.uint32)[None, :])
    if DO_IN:  # grad_input: g · (step_w/2) along the channels, one scale per token per 128 channels
        v = g * (0.5 * tl.load(unit_in_ptr + cols, mask=cols < N, other=0.0))[None, :]
        step = tl.maximum(tl.max(tl.abs(v), axis=1) / 127.0, tiny)
        q = _round(v * (1 / step)[:, None], bits >> 16, SR_IN)
        tl.store(qin_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], q, mask=ok)
        tl.store(sin_ptr + rows * tl.cdiv(N, BLOCK) + pid_n, step, mask=rows < M)
    if DO_W:  # grad_weight: g · (step_x/2) along the tokens, one scale per channel per 128 tokens; stored as gᵀ
        v = g * (0.5 * tl.load(unit_w_ptr + rows, mask=rows < M, other=0.0))[:, None]
        step = tl.maximum(tl.max(tl.abs(v), axis=0) / 127.0, tiny)
        q = _round(v * (1 / step)[None, :], bits & 0xFFFF, SR_W)
        # Stored transposed: the compiler moves the bytes through shared memory so that the stores run along the
        # tokens, coalesced (fewer instructions than an explicit tl.trans, whose read-back goes byte by byte).
        tl.store(qw_ptr + cols.to(tl.int64)[None, :] * M + rows[:, None], q, mask=ok)
        tl.store(sw_ptr + cols * tl.cdiv(M, BLOCK) + pid_m, step, mask=cols < N)


@triton.jit
def _codes_t_kernel(packed_ptr, out_ptr, R, K, stride_packed, BITS: tl.constexpr, FIELD_BITS: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    WIDTH: tl.constexpr = BLOCK_K * FIELD_BITS // 8
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    byte_cols = k0 * FIELD_BITS // 8 + tl.arange(0, WIDTH)
    fields = tl.load(packed_ptr + rows.to(tl.int64)[:, None] * stride_packed + byte_cols[None, :],
                     mask=(rows < R)[:, None] & (byte_cols < tl.cdiv(K * FIELD_BITS, 8))[None, :], other=0)
    codes = 2 * unpack_block(fields, FIELD_BITS, BLOCK_R, BLOCK_K) - (2**BITS - 1)
    ok = (rows < R)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + cols.to(tl.int64)[None, :] * R + rows[:, None], codes.to(tl.int8), mask=ok)


@triton.jit
def _block_scaled_gemm_kernel(a_ptr, sa_ptr, b_ptr, mask_ptr, stride_mask, signs_ptr, out_ptr, R, C, RED,
                              inv_sqrt_block, ROTATE: tl.constexpr, DOT: tl.constexpr, EVEN_RED: tl.constexpr,
                              BLOCK_M: tl.constexpr):
    BLOCK_N: tl.constexpr = 128
    BLOCK_K: tl.constexpr = 128
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the end wrap onto real rows (computed, never stored): the loads need no row masks.
    a_rows = a_ptr + (rm % R).to(tl.int64)[:, None] * RED
    b_cols = b_ptr + (rn % C).to(tl.int64)[None, :] * RED
    s_rows = sa_ptr + (rm % R) * tl.cdiv(RED, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, RED, BLOCK_K):
        kk = k0 + rk
        if EVEN_RED:
            a = tl.load(a_rows + kk[None, :])
            b = tl.load(b_cols + kk[:, None])
        else:
            a = tl.load(a_rows + kk[None, :], mask=(kk < RED)[None, :], other=0)
            b = tl.load(b_cols + kk[:, None], mask=(kk < RED)[:, None], other=0)
        # Exact int32 products and sums within the block; the block's scale then takes it into fp32.
        part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
        acc += part * tl.load(s_rows + k0 // BLOCK_K)[:, None]
    mask_cols = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    bytes_ = tl.load(mask_ptr + (rm % R).to(tl.int64)[:, None] * stride_mask + mask_cols[None, :],
                     mask=(mask_cols < tl.cdiv(C, 8))[None, :], other=0)
    acc = tl.where(unpack_block(bytes_, 1, BLOCK_M, BLOCK_N) != 0, acc, 0.0)
    if ROTATE:
        signs = tl.load(signs_ptr + tl.arange(0, BLOCK_N)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
        acc = dot_signs(acc, signs, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT) * inv_sqrt_block
    ok = (rm < R)[:, None] & (rn < C)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * C + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def quantize_gradient(grad_y: torch.Tensor, xq: QuantizedRows, wq: QuantizedRows, grad_input: GradSpec,
                      grad_weight: GradSpec, seed: int
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """The quantized gradient operands of the two GEMMs from ``grad_y`` ``[M, N]`` (fp32/bf16, any strides):
    ``((q [M, N], scales [M, ceil(N/128)]) or None, (qᵀ [N, M], scales [N, ceil(M/128)]) or None)`` for
    ``grad_input`` / ``grad_weight`` (None where that spec is bf16); ``q`` int8, scales fp32 (``q · scale`` is
    the quantized ``g_y · u``). ``seed``: the layer call's seed (:func:`~bitlaw.kernels.gradients.uniform_pair`)."""
    check_device(grad_y, "quantize_gradient")
    m, n = grad_y.shape
    device = grad_y.device
    out_in = out_w = None
    if grad_input.quantized:
        out_in = (torch.empty(m, n, dtype=torch.int8, device=device),
                  torch.empty(m, triton.cdiv(n, TILE), dtype=torch.float32, device=device))
    if grad_weight.quantized:
        out_w = (torch.empty(n, m, dtype=torch.int8, device=device),
                 torch.empty(n, triton.cdiv(m, TILE), dtype=torch.float32, device=device))
    if m and n and (out_in or out_w):
        dummy = wq.step
        qin, sin = out_in or (dummy, dummy)
        qw, sw = out_w or (dummy, dummy)
        _quantize_grad_kernel[(triton.cdiv(m, TILE), triton.cdiv(n, TILE))](
            grad_y, grad_y.stride(0), grad_y.stride(1), wq.step, xq.step, qin, sin, qw, sw, m, n,
            seed_key(seed), DO_IN=out_in is not None,
            DO_W=out_w is not None, SR_IN=grad_input.stochastic, SR_W=grad_weight.stochastic,
            num_warps=pick(QUANT_WARPS, 4))
    return out_in, out_w


def transposed_codes(rows: QuantizedRows) -> torch.Tensor:
    """The odd codes of ``rows`` ``[R, K]`` transposed: ``[K, R]`` int8."""
    if rows.packed is None:
        raise ValueError("transposed_codes: the rows hold no packed codes (quantize_rows(..., packed=True))")
    check_device(rows.step, "transposed_codes")
    r, k = rows.rows, rows.k
    out = torch.empty(k, r, dtype=torch.int8, device=rows.step.device)
    if r and k:
        _codes_t_kernel[(triton.cdiv(r, 64), triton.cdiv(k, TILE))](
            rows.packed, out, r, k, rows.packed.stride(0), BITS=rows.bits, FIELD_BITS=rows.field_bits, BLOCK_R=64,
            num_warps=4)
    return out


def block_scaled_gemm(a: torch.Tensor, scales: torch.Tensor, b: torch.Tensor, masked: QuantizedRows,
                      out_dtype: torch.dtype, grad_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``IHT(M ⊙ Σ_j s[:, j] · (a[:, j-th 128 block] · b[:, j-th block]ᵀ))`` ``[R, C]`` in ``out_dtype`` (fp32/bf16):
    ``a`` ``[R, RED]`` and ``b`` ``[C, RED]`` int8, ``scales``
    ``[R, ceil(RED/128)]`` fp32; ``M`` the bit mask of ``masked`` (``R`` rows of ``C``), the inverse Hadamard (blocks
    of 128 along ``C``) when ``masked.rotated``. The rotation's dot reads the sum in ``grad_dtype``, the output
    gradient's: one bf16 dot for bf16 training (as QuEST's backward rounds its bf16 GEMM), exact fp32 otherwise."""
    r, red = a.shape
    c = b.shape[0]
    if b.shape[1] != red or (masked.rows, masked.k) != (r, c):
        raise ValueError(f"block_scaled_gemm: a {tuple(a.shape)}, b {tuple(b.shape)} and the mask's rows "
                         f"({masked.rows}, {masked.k}) do not fit; expected a [R, RED], b [C, RED], mask R × C")
    check_device(a, "block_scaled_gemm")
    out = torch.empty(r, c, dtype=torch.float32 if INTERPRETED else out_dtype, device=a.device)
    if r and c:
        if red == 0:
            return out.zero_().to(out_dtype)
        block_m, warps, stages = GEMM_LAUNCH[90 if capability(a.device) >= 90 else 80]
        block_m = pick(block_m, 64)
        dot = dot_mode(grad_dtype)
        _block_scaled_gemm_kernel[(triton.cdiv(r, block_m), triton.cdiv(c, TILE))](
            a, scales, b, masked.mask, masked.mask.stride(0), signs_for(dot, a.device), out, r, c, red,
            1.0 / math.sqrt(HADAMARD_BLOCK), ROTATE=masked.rotated, DOT=dot, EVEN_RED=red % TILE == 0,
            BLOCK_M=block_m, num_warps=pick(warps, 4), num_stages=pick(stages, 1))
    return out.to(out_dtype)
