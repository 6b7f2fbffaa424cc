"""The quantized backward: 8-bit output gradients with row-wise scales, both GEMMs on the vendor's 8-bit GEMMs.

docs/numerics.md §8 and :mod:`bitlaw.kernels.gradients` (the reference) define the numbers. Each backward GEMM
multiplies a quantized gradient operand by the other role's exact integer codes:

- ``grad_input``: ``g_x = IHT(M_x ⊙ (s_in · Q(g_y · u_w)) · C_w)``, ``Q`` with one scale per token (row of ``g_y``);
- ``grad_weight``: ``g_w = IHT(M_w ⊙ (s_w · Q(g_yᵀ · u_x)) · C_x)``, one scale per output channel (column of ``g_y``);

``u`` is half the other role's row step (the fold that lets its codes ``C`` enter the GEMM exactly). Row-wise scales
are what the vendor GEMMs take in their epilogue: fp8 (e4m3, e5m2) operands go to ``torch._scaled_mm`` against the
e4m3 codes, int8 to ``torch._int_mm`` against int8 codes (:mod:`bitlaw.kernels.triton.vendor`). Three Triton
passes feed them, all memory-bound:

- :func:`quantize_gradient`: one read of ``g_y`` ``[M, N]`` in 128 × 128 tiles for the scales (an absmax per
  token and per channel, merged across tiles by atomic max), then a second read that rounds and writes the 8-bit
  operands, ``Q(g_y · u_w)`` ``[M, N]`` and ``Q(g_y · u_x)ᵀ`` ``[N, M]`` (transposed, so both GEMM operands are
  contiguous along the reduced dimension). Rounding: nearest or stochastic, the uniform numbers from the
  counter-based generator of :func:`bitlaw.kernels.gradients.uniform_pair` (one 32-bit hash per entry of ``g_y``,
  16 bits for each GEMM), so kernel and reference draw the same bits. fp8 values are written as their bytes.
- :func:`transposed_codes`: the saved packed codes of a role as e4m3 (or int8) codes, transposed (``[K, R]``).

Supported: ``fp8_e4m3``, ``fp8_e5m2`` and ``int8`` gradients with ``scale: token`` for ``grad_input`` and
``scale: channel`` for ``grad_weight``, no gradient rotation, against codes of up to 4 bits (the e4m3-exact
ones; int8 gradients against up to 7). Block scales run the reference: no vendor 8-bit GEMM of the installed torch
takes scales that vary along the reduced dimension on every device.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

from ..gradients import GRIDS, seed_key
from ..recipe import GradSpec
from .backward import masked_rotate
from .common import E4M3_BITS, MAX_BITS, check_device, e4m3_byte, pick, unpack_block
from .quant import QuantizedRows
from .vendor import scaled_matmul

TILE = 128  # rows and columns of g_y per program of the absmax pass; columns of the rounding pass
QUANT_WARPS = 8  # 128 × 128 tiles of the absmax pass: 64 entries per thread
# The rounding pass: 32 × 128 tiles on 4 warps keep their 32 entries per thread (and their random bits, two
# roundings and two fp8 encodings) in registers without spilling, three CTAs to a multiprocessor (the static
# profile).
QUANT_ROWS, ROUND_WARPS = 32, 4
# The GradSpec.scale of each GEMM that is row-wise for its gradient operand (grad_weight's operand is g_yᵀ).
ROW_SCALE = {"grad_input": "token", "grad_weight": "channel"}
# The 8-bit dtype of each gradient format and the FORMAT constexpr of the kernels.
GRAD_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FORMAT_IDS = {"int8": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}


def unsupported_reason(spec: GradSpec, bits: int, role: str) -> str | None:
    """Why the fast path cannot run ``spec`` for the ``role`` GEMM against ``bits``-bit codes (None when it can)."""
    if not spec.quantized:
        return None
    if spec.scale != ROW_SCALE[role]:
        return (f"{role}: scale {spec.scale!r} (the vendor GEMMs take scales per row of the gradient operand: "
                f"scale '{ROW_SCALE[role]}' for {role})")
    if spec.hadamard:
        return f"{role}: hadamard (the rotated gradient runs only on the reference path)"
    limit = MAX_BITS if spec.format == "int8" else E4M3_BITS
    if bits > limit:
        return f"{role}: {bits}-bit codes are not exact in the {spec.format} GEMM's other operand (up to {limit} bits)"
    return None


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _amax_kernel(g_ptr, stride_gm, stride_gn, unit_in_ptr, unit_w_ptr, amax_in_ptr, amax_w_ptr, M, N,
                 DO_IN: tl.constexpr, DO_W: tl.constexpr):
    BLOCK: tl.constexpr = 128
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.abs(tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn, mask=ok,
                       other=0.0).to(tl.float32))
    # Maxima of non-negative floats: their order is that of their bits, which atomic max compares.
    if DO_IN:
        v = g * tl.load(unit_in_ptr + cols, mask=cols < N, other=0.0)[None, :]
        tl.atomic_max(amax_in_ptr + rows, tl.max(v, axis=1), mask=rows < M)
    if DO_W:
        v = g * tl.load(unit_w_ptr + rows, mask=rows < M, other=0.0)[:, None]
        tl.atomic_max(amax_w_ptr + cols, tl.max(v, axis=0), mask=cols < N)


@triton.jit
def _to_grid(v, bits16, FORMAT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """``v`` (fp32, scaled into the format's range up to float rounding) onto the grid of ``FORMAT`` (0 int8, 1
    e4m3, 2 e5m2): ``floor(v/Δ + ξ)·Δ`` with ``ξ = (bits16 + ½)·2^-16`` or ½ (nearest), clamped to the largest
    value (int8: only from above, as the reference), returned as the format's byte (int32).

    fp8 in integer arithmetic on ``v``'s bits: where ``v`` is a normal number of the format, ``v/Δ`` is its fp32
    mantissa read above bit ``23 − MANTISSA``, so adding ``ξ`` in those units (``⌈·⌉`` from ``−ξ`` for negative
    ``v``: the floor of a negative value) and truncating rounds it, a carry moving into the exponent by itself; the
    byte is then the exponent re-biased and the kept mantissa bits. Below the normal range the spacing is fixed
    and the float formula is cheap."""
    if STOCHASTIC:
        shift = (bits16.to(tl.float32) + 0.5) * 1.52587890625e-05  # 2^-16
    else:
        shift = 0.5
    if FORMAT == 0:
        byte = tl.minimum(tl.floor(v + shift).to(tl.int32), 127) & 0xFF
    else:
        MANTISSA: tl.constexpr = 3 if FORMAT == 1 else 2
        BIAS: tl.constexpr = 7 if FORMAT == 1 else 15
        LARGEST_BYTE: tl.constexpr = 0x7E if FORMAT == 1 else 0x7B  # 448 = 1.75·2^8; 57344 = 1.75·2^15
        LOW: tl.constexpr = 23 - MANTISSA  # fp32 mantissa bits below the format's
        bits = v.to(tl.int32, bitcast=True)
        negative = bits < 0
        magnitude = bits & 0x7FFFFFFF
        if STOCHASTIC:
            up = (bits16.to(tl.int32) << (LOW - 16)) + (1 << (LOW - 17))  # ξ in units of 2^-LOW
        else:
            up = tl.full(bits.shape, 1 << (LOW - 1), tl.int32)
        rounded = (magnitude + tl.where(negative, (1 << LOW) - 1 - up, up)) >> LOW
        normal = tl.minimum(rounded - ((127 - BIAS) << MANTISSA), LARGEST_BYTE)
        # Subnormal: multiples of 2^(1 − BIAS − MANTISSA), counted as the byte itself (a count of 2^MANTISSA is the
        # smallest normal number's byte).
        SCALE: tl.constexpr = 2.0 ** (BIAS - 1 + MANTISSA)
        # Capped at ±1 so that the lanes of normal numbers (unused here) convert without overflow.
        subnormal = tl.abs(tl.floor(tl.minimum(tl.maximum(v, -1.0), 1.0) * SCALE + shift)).to(tl.int32)
        small = magnitude < ((128 - BIAS) << 23)  # |v| < 2^(1 − BIAS)
        byte = tl.where(small, subnormal, normal) | (negative.to(tl.int32) << 7)
    return byte


@triton.jit
def _quantize_grad_kernel(g_ptr, stride_gm, stride_gn, unit_in_ptr, unit_w_ptr, amax_in_ptr, amax_w_ptr, qin_ptr,
                          sin_ptr, qw_ptr, sw_ptr, M, N, key, largest_in, largest_w, DO_IN: tl.constexpr,
                          DO_W: tl.constexpr, FORMAT_IN: tl.constexpr, FORMAT_W: tl.constexpr, SR_IN: tl.constexpr,
                          SR_W: tl.constexpr, ROWS: tl.constexpr):
    BLOCK: tl.constexpr = 128
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn, mask=ok,
                other=0.0).to(tl.float32)
    tiny = 1.1754943508222875e-38
    bits = tl.zeros([ROWS, BLOCK], dtype=tl.uint32)
    if SR_IN or SR_W:  # one hash per entry of g_y: its high half for grad_input, its low half for grad_weight
        # The counter m·N + n + key (mod 2^32): the key joins each row's base, one add per entry.
        bits = _hash32((rows * N + key).to(tl.uint32)[:, None] + cols.to(tl.uint32)[None, :])
    if DO_IN:  # grad_input: g · (step_w/2) along the channels, one scale per token
        v = g * tl.load(unit_in_ptr + cols, mask=cols < N, other=0.0)[None, :]
        step = tl.maximum(tl.load(amax_in_ptr + rows, mask=rows < M, other=0.0) / largest_in, tiny)
        byte = _to_grid(v * (1 / step)[:, None], bits >> 16, FORMAT_IN, SR_IN)
        tl.store(qin_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], byte.to(tl.uint8), mask=ok)
        if pid_n == 0:
            tl.store(sin_ptr + rows, step, mask=rows < M)
    if DO_W:  # grad_weight: g · (step_x/2) along the tokens, one scale per channel; stored as gᵀ
        v = g * tl.load(unit_w_ptr + rows, mask=rows < M, other=0.0)[:, None]
        step = tl.maximum(tl.load(amax_w_ptr + cols, mask=cols < N, other=0.0) / largest_w, tiny)
        byte = _to_grid(v * (1 / step)[None, :], bits & 0xFFFF, FORMAT_W, SR_W)
        # Stored transposed: the compiler moves the bytes through shared memory so that the stores run along the
        # tokens, coalesced.
        tl.store(qw_ptr + cols.to(tl.int64)[None, :] * M + rows[:, None], byte.to(tl.uint8), mask=ok)
        if pid_m == 0:
            tl.store(sw_ptr + cols, step, mask=cols < N)


@triton.jit
def _codes_t_kernel(packed_ptr, out_ptr, R, K, stride_packed, BITS: tl.constexpr, FIELD_BITS: tl.constexpr,
                    FP8: tl.constexpr, BLOCK_R: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    WIDTH: tl.constexpr = BLOCK_K * FIELD_BITS // 8
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    byte_cols = k0 * FIELD_BITS // 8 + tl.arange(0, WIDTH)
    fields = tl.load(packed_ptr + rows.to(tl.int64)[:, None] * stride_packed + byte_cols[None, :],
                     mask=(rows < R)[:, None] & (byte_cols < tl.cdiv(K * FIELD_BITS, 8))[None, :], other=0)
    codes = 2 * unpack_block(fields, FIELD_BITS, BLOCK_R, BLOCK_K) - (2**BITS - 1)
    if FP8:
        codes = e4m3_byte(codes)
    ok = (rows < R)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + cols.to(tl.int64)[None, :] * R + rows[:, None], (codes & 0xFF).to(tl.uint8), mask=ok)


def _empty_operand(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, cols, dtype=torch.uint8, device=device),
            torch.empty(rows, dtype=torch.float32, device=device))


def quantize_gradient(grad_y: torch.Tensor, xq: QuantizedRows, wq: QuantizedRows, grad_input: GradSpec,
                      grad_weight: GradSpec, seed: int
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """The quantized gradient operands of the two GEMMs from ``grad_y`` ``[M, N]`` (fp32/bf16, any strides):
    ``((q [M, N], scales [M]) or None, (qᵀ [N, M], scales [N]) or None)`` for ``grad_input`` / ``grad_weight``
    (None where that spec is bf16); ``q`` in the spec's 8-bit dtype (:data:`GRAD_DTYPES`), scales fp32 (``q · scale``
    is the quantized ``g_y · u`` row by row). ``seed``: the layer call's seed
    (:func:`~bitlaw.kernels.gradients.uniform_pair`)."""
    check_device(grad_y, "quantize_gradient")
    m, n = grad_y.shape
    device = grad_y.device
    out_in = _empty_operand(m, n, device) if grad_input.quantized else None
    out_w = _empty_operand(n, m, device) if grad_weight.quantized else None
    if m and n and (out_in or out_w):
        amax_in = torch.zeros(m if out_in else 1, dtype=torch.float32, device=device)
        amax_w = torch.zeros(n if out_w else 1, dtype=torch.float32, device=device)
        grid = (triton.cdiv(m, TILE), triton.cdiv(n, TILE))
        flags = {"DO_IN": out_in is not None, "DO_W": out_w is not None}
        _amax_kernel[grid](grad_y, grad_y.stride(0), grad_y.stride(1), wq.step, xq.step, amax_in, amax_w, m, n,
                           **flags, num_warps=pick(QUANT_WARPS, 4))
        # Half the other role's step, the value of one of its code units, folded into g_y.
        amax_in.mul_(0.5)
        amax_w.mul_(0.5)
        dummy = wq.step
        qin, sin = out_in or (dummy, dummy)
        qw, sw = out_w or (dummy, dummy)
        _quantize_grad_kernel[(triton.cdiv(m, QUANT_ROWS), triton.cdiv(n, TILE))](
            grad_y, grad_y.stride(0), grad_y.stride(1), wq.step * 0.5, xq.step * 0.5, amax_in, amax_w, qin, sin,
            qw, sw, m, n, seed_key(seed), _largest(grad_input), _largest(grad_weight), **flags,
            FORMAT_IN=FORMAT_IDS.get(grad_input.format, 0), FORMAT_W=FORMAT_IDS.get(grad_weight.format, 0),
            SR_IN=grad_input.stochastic, SR_W=grad_weight.stochastic, ROWS=QUANT_ROWS, num_warps=ROUND_WARPS)
    out_in = None if out_in is None else (out_in[0].view(GRAD_DTYPES[grad_input.format]), out_in[1])
    out_w = None if out_w is None else (out_w[0].view(GRAD_DTYPES[grad_weight.format]), out_w[1])
    return out_in, out_w


def _largest(spec: GradSpec) -> float:
    return GRIDS[spec.format].largest if spec.quantized else 1.0


def transposed_codes(rows: QuantizedRows, fp8: bool = True) -> torch.Tensor:
    """The odd codes of ``rows`` ``[R, K]`` transposed: ``[K, R]``, fp8 e4m3 (``fp8``; codes of up to 4 bits) or
    int8."""
    if rows.packed is None:
        raise ValueError("transposed_codes: the rows hold no packed codes (quantize_rows(..., packed=True))")
    if fp8 and rows.bits > E4M3_BITS:
        raise ValueError(f"transposed_codes: {rows.bits}-bit codes are not exact in e4m3 (up to {E4M3_BITS} bits)")
    check_device(rows.step, "transposed_codes")
    r, k = rows.rows, rows.k
    out = torch.empty(k, r, dtype=torch.uint8, device=rows.step.device)
    if r and k:
        _codes_t_kernel[(triton.cdiv(r, 64), triton.cdiv(k, TILE))](
            rows.packed, out, r, k, rows.packed.stride(0), BITS=rows.bits, FIELD_BITS=rows.field_bits, FP8=fp8,
            BLOCK_R=64, num_warps=4)
    return out.view(torch.float8_e4m3fn if fp8 else torch.int8)


def quantized_grad_gemm(operand: tuple[torch.Tensor, torch.Tensor], other: QuantizedRows, masked: QuantizedRows,
                        out_dtype: torch.dtype, grad_dtype: torch.dtype) -> torch.Tensor:
    """``IHT(M ⊙ diag(s)·q·C)`` ``[R, C]`` in ``out_dtype``: ``operand = (q [R, RED], s [R])`` from
    :func:`quantize_gradient`, ``C`` the ``[RED, C]`` codes of ``other``, ``M`` the mask of ``masked`` (``R`` rows of
    ``C``), the inverse Hadamard when ``masked.rotated``. The GEMM writes ``grad_dtype`` (the output gradient's: a
    bf16 sum for bf16 training, as QuEST's backward rounds its bf16 GEMM), which the mask + rotation pass reads."""
    q, scale = operand
    codes = transposed_codes(other, fp8=q.dtype != torch.int8)
    return masked_rotate(scaled_matmul(q, scale, codes, None, grad_dtype), masked, out_dtype)
