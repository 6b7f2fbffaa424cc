"""Fused Triton forward quantizer: block-Hadamard rotation, Gaussian RMS scale, centred rounding and mask in one kernel.

``quantize_rows(x, spec)`` turns ``[M, K]`` fp32/bf16 rows into odd integer codes ``2q+1`` (docs/numerics.md §3), a
per-row step and the bit-packed gradient mask (docs/numerics.md §4), equal to
:func:`bitlaw.kernels.quantizers.quantize` except where a value lies within float rounding of a boundary. Codes are
kept either unpacked, as int8 odd codes (the operand form of the int8 GEMM), or packed in the one storage encoding
of :mod:`bitlaw.kernels.packing`: level-index fields of ``field_bits(2^b)`` bits (int1 → 1, int2 → 2, int3/int4 → 4,
int5 … int7 → 8). The mask is packed one bit per element. The GEMM kernels read both forms directly.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import triton
import triton.language as tl
from bitlaw.kernels.packing import field_bits, unpack_codes, unpack_mask
from bitlaw.kernels.recipe import TensorSpec
from triton import knobs

HADAMARD_BLOCK = 128  # the only rotation block the kernels implement (one 128×128 H tile per dot)
MAX_BITS = 7  # odd codes up to ±(2^7 − 1) = ±127 fit int8; int8's ±255 do not
TILE_K = 128  # columns per step of the quantizer loop: one Hadamard block
INTERPRETED: bool = bool(knobs.runtime.interpret)  # read when the kernels below are decorated, as Triton does
# Under the interpreter dots run in numpy fp32 ("ieee"); on GPU fp32 operands use 3×TF32, close to fp32 accuracy.
FP32_DOT_PRECISION = "ieee" if INTERPRETED else "tf32x3"
_TINY = torch.finfo(torch.float32).tiny  # the reference's scale floor for all-zero rows


def _configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    # One config under the interpreter: autotuning there would only multiply the (slow) runs.
    return [interpreter] if INTERPRETED else gpu


@triton.jit
def hadamard_signs(BLOCK: tl.constexpr):
    """The ±1 Sylvester matrix ``[BLOCK, BLOCK]`` (fp32): entry (i, j) = (−1)^popcount(i & j)."""
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    bits = rows & cols
    # Parity of the popcount by xor-folding (indices < 2^16).
    bits = bits ^ (bits >> 8)
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    return (1 - 2 * (bits & 1)).to(tl.float32)


@triton.jit
def load_codes(ptr, rows, cols, ok, stride_row, BITS: tl.constexpr, FIELD_BITS: tl.constexpr):
    """Odd codes as int8 at broadcastable ``rows``/``cols`` (0 where ``ok`` is False). ``FIELD_BITS`` 0: the
    tensor holds int8 odd codes; 1, 2, 4, 8: packed level-index fields of ``int{BITS}``, code = 2·index − 2^BITS + 1."""
    if FIELD_BITS == 0:
        codes = tl.load(ptr + rows * stride_row + cols, mask=ok, other=0)
    else:
        PER_BYTE: tl.constexpr = 8 // FIELD_BITS
        byte = tl.load(ptr + rows * stride_row + cols // PER_BYTE, mask=ok, other=0).to(tl.int32)
        index = (byte >> ((cols % PER_BYTE) * FIELD_BITS)) & ((1 << FIELD_BITS) - 1)
        codes = tl.where(ok, 2 * index - (2**BITS - 1), 0)
    return codes.to(tl.int8)


@triton.jit
def load_mask_bits(ptr, rows, cols, ok, stride_row):
    """The gradient-mask bits (int1) at broadcastable ``rows``/``cols`` from one-bit-per-element bytes."""
    byte = tl.load(ptr + rows * stride_row + cols // 8, mask=ok, other=0).to(tl.int32)
    return ((byte >> (cols % 8)) & 1) != 0


@triton.jit
def _pack_fields(fields, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, FIELD_BITS: tl.constexpr):
    # [BLOCK_M, WIDTH] small non-negative ints → [BLOCK_M, WIDTH·FIELD_BITS/8] bytes, first element in the low bits.
    PER_BYTE: tl.constexpr = 8 // FIELD_BITS
    grouped = tl.reshape(fields, [BLOCK_M, WIDTH // PER_BYTE, PER_BYTE])
    shifts = tl.arange(0, PER_BYTE) * FIELD_BITS
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.autotune(
    configs=_configs([triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (16, 32, 64) for w in (4, 8)],
                     triton.Config({"BLOCK_M": 64})),
    key=["K", "BITS", "FIELD_BITS", "ROTATE", "DOT_BF16"],
)
@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, step_ptr, mask_ptr, M, K, stride_x, stride_codes, stride_mask,
                     row_len, gaussian_scale, mask_coef, inv_sqrt_block,
                     BITS: tl.constexpr, FIELD_BITS: tl.constexpr, ROTATE: tl.constexpr, ONE_PASS: tl.constexpr,
                     DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs = tl.arange(0, BLOCK_K)
    # The rotation is orthonormal, so the row's sum of squares can be taken before rotating (docs/numerics.md §3).
    if ONE_PASS:  # the whole row is one tile: read it once
        x_row = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :],
                        mask=row_ok[:, None] & (offs[None, :] < K), other=0.0).to(tl.float32)
        sumsq = tl.sum(x_row * x_row, axis=1)
    else:  # first pass: sum of squares; the second pass re-reads the rows (mostly from L2)
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                        mask=row_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
    # Same operation order as the reference: α = c·sqrt(mean), floored; step = 2α/(2^b − 1); T = coef·α.
    mean_square = tl.math.div_rn(sumsq, tl.full([BLOCK_M], row_len, tl.float32))
    alpha = tl.maximum(gaussian_scale * tl.sqrt_rn(mean_square), 1.1754943508222875e-38)
    step = tl.math.div_rn(2.0 * alpha, tl.full([BLOCK_M], 2**BITS - 1, tl.float32))
    threshold = mask_coef * alpha
    tl.store(step_ptr + rows, step, mask=row_ok)
    if ROTATE:
        signs = hadamard_signs(BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        col_ok = cols < K
        if ONE_PASS:
            x = x_row
        else:
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if ROTATE:
            # x · H with H = signs/sqrt(128): the ±1 dot has exact products; one fp32 scaling after it.
            if DOT_BF16:
                x = tl.dot(x.to(tl.bfloat16), signs.to(tl.bfloat16)) * inv_sqrt_block
            else:
                x = tl.dot(x, signs, input_precision=PRECISION) * inv_sqrt_block
        # Correctly rounded division, as the reference's x_h / step (Triton's "/" may be approximate on GPU).
        q = tl.floor(tl.math.div_rn(x, step[:, None]))
        q = tl.minimum(tl.maximum(q, -(2 ** (BITS - 1))), 2 ** (BITS - 1) - 1).to(tl.int32)
        keep = (tl.abs(x) <= threshold[:, None]) & col_ok[None, :]
        if FIELD_BITS == 0:
            tl.store(codes_ptr + rows[:, None] * stride_codes + cols[None, :], (2 * q + 1).to(tl.int8),
                     mask=row_ok[:, None] & col_ok[None, :])
        else:
            PER_BYTE: tl.constexpr = 8 // FIELD_BITS
            index = q + 2 ** (BITS - 1)  # the level index of docs/numerics.md §6
            packed = _pack_fields(tl.where(col_ok[None, :], index, 0), BLOCK_M, BLOCK_K, FIELD_BITS)
            byte_cols = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
            tl.store(codes_ptr + rows[:, None] * stride_codes + byte_cols[None, :], packed,
                     mask=row_ok[:, None] & (byte_cols[None, :] < tl.cdiv(K, PER_BYTE)))
        mask_bytes = _pack_fields(keep.to(tl.int32), BLOCK_M, BLOCK_K, 1)
        byte_cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        tl.store(mask_ptr + rows[:, None] * stride_mask + byte_cols[None, :], mask_bytes,
                 mask=row_ok[:, None] & (byte_cols[None, :] < tl.cdiv(K, 8)))


@triton.jit
def _dequantize_kernel(codes_ptr, step_ptr, out_ptr, R, K, stride_codes, stride_out, inv_sqrt_block,
                       BITS: tl.constexpr, FIELD_BITS: tl.constexpr, ROTATE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < R) & (cols[None, :] < K)
    codes = load_codes(codes_ptr, rows[:, None], cols[None, :], ok, stride_codes, BITS, FIELD_BITS).to(tl.float32)
    if ROTATE:
        # Odd codes ≤ 127 times ±1 summed over 128 terms are exact integers in fp32 whatever the dot precision.
        codes = tl.dot(codes, hadamard_signs(BLOCK_K), input_precision="tf32")
        codes = codes * inv_sqrt_block
    half_step = 0.5 * tl.load(step_ptr + rows, mask=rows < R, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], codes * half_step[:, None], mask=ok)


@dataclass(frozen=True)
class PackedRows:
    """Rows quantized by :func:`quantize_rows`, in the rotated domain when ``rotated``.

    codes: ``[R, K]`` int8 odd codes ``2q+1`` when not ``packed``, else ``[R, ceil(K·field_bits/8)]`` uint8
           level-index fields (:mod:`bitlaw.kernels.packing`). Values are ``(2q+1) · step/2``.
    step:  ``[R]`` fp32, ``2α/(2^bits − 1)``.
    mask:  ``[R, ceil(K/8)]`` uint8, one bit per element, set where the gradient flows.
    """

    codes: torch.Tensor
    step: torch.Tensor
    mask: torch.Tensor
    k: int
    bits: int
    packed: bool
    rotated: bool

    @property
    def rows(self) -> int:
        return self.step.shape[0]

    @property
    def field_bits(self) -> int:
        """Bits per stored code: the packed field width, or 0 for unpacked int8 odd codes (the kernels' flag)."""
        return field_bits(2**self.bits) if self.packed else 0

    def nbytes(self) -> int:
        """Bytes held by the codes, steps and mask."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.step, self.mask))

    def unpacked_codes(self) -> torch.Tensor:
        """Odd codes ``[R, K]`` int8."""
        return unpack_codes(self.codes, self.bits, self.k) if self.packed else self.codes

    def unpacked_mask(self) -> torch.Tensor:
        """Gradient mask ``[R, K]`` bool."""
        return unpack_mask(self.mask, self.k)

    def values(self) -> torch.Tensor:
        """Dequantized values ``[R, K]`` fp32 in the quantization domain (torch, for tests and small tensors)."""
        return self.unpacked_codes().float() * (self.step[:, None] * 0.5)


def unsupported_reason(spec: TensorSpec) -> str | None:
    """Why :func:`quantize_rows` cannot quantize by ``spec`` (None when it can)."""
    fmt = spec.fmt
    if fmt.kind != "int":
        return f"format {spec.format!r} is not an integer format (the kernels take int1 … int{MAX_BITS})"
    if fmt.bits > MAX_BITS:
        return f"format {spec.format!r}: odd codes ±{2**fmt.bits - 1} do not fit int8 (int1 … int{MAX_BITS})"
    if spec.scale != "gaussian_rms":
        return f"scale {spec.scale!r} (the kernels implement gaussian_rms)"
    if spec.rotated and spec.block != HADAMARD_BLOCK:
        return f"hadamard block {spec.block} (the kernels implement {HADAMARD_BLOCK})"
    return None


def check_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` as a 2-D fp32/bf16 tensor the kernels can read (last dimension contiguous); errors name ``what``."""
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [rows, K] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{what}: dtype {x.dtype} is not supported; allowed: torch.float32, torch.bfloat16")
    check_device(x, what)
    # Any row stride is read in place; a strided last dimension is copied once.
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def check_device(x: torch.Tensor, what: str) -> None:
    """Raise unless Triton can run on ``x``'s device (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"{what}: the Triton kernels need CUDA tensors (got device {x.device}); on CPU set "
                           "TRITON_INTERPRET=1 before bitlaw.kernels.triton.quant is imported")


def quantize_rows(x: torch.Tensor, spec: TensorSpec, pack: bool = False) -> PackedRows:
    """Quantize each row of ``x`` ``[M, K]`` (fp32/bf16) by ``spec`` in one fused kernel. See :class:`PackedRows`.

    ``spec`` must be an ``int1 … int7`` format with ``gaussian_rms`` scale and Hadamard block 128 (or no rotation);
    when rotated ``K`` must be a multiple of 128. ``pack`` stores level-index fields instead of int8 odd codes.
    """
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"quantize_rows: {reason}; use kernels.quantizers.quantize for this spec")
    x = check_rows(x, "quantize_rows: x")
    m, k = x.shape
    if spec.rotated and k % HADAMARD_BLOCK:
        raise ValueError(f"quantize_rows: K={k} is not a multiple of the Hadamard block {HADAMARD_BLOCK} "
                         f"(x has shape {tuple(x.shape)}); allowed: K = 128·n, or rotation: none")
    bits = spec.fmt.bits
    width = field_bits(2**bits) if pack else 0
    codes = torch.empty(m, -(-k * width // 8) if pack else k, dtype=torch.uint8 if pack else torch.int8,
                        device=x.device)
    step = torch.empty(m, dtype=torch.float32, device=x.device)
    mask = torch.empty(m, -(-k // 8), dtype=torch.uint8, device=x.device)
    if m and k:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        _quantize_kernel[grid](
            x, codes, step, mask, m, k, x.stride(0), codes.stride(0), mask.stride(0),
            float(k), spec.gaussian_scale, spec.mask_threshold * spec.fmt.max_level, 1.0 / math.sqrt(HADAMARD_BLOCK),
            BITS=bits, FIELD_BITS=width, ROTATE=spec.rotated, ONE_PASS=k <= TILE_K,
            DOT_BF16=x.dtype == torch.bfloat16 and not INTERPRETED, PRECISION=FP32_DOT_PRECISION, BLOCK_K=TILE_K)
    return PackedRows(codes, step, mask, k, bits, pack, spec.rotated)


def dequantize_rows(rows: PackedRows, unrotate: bool = True) -> torch.Tensor:
    """Values ``[R, K]`` fp32, rotated back to the original domain when ``unrotate`` and ``rows.rotated``."""
    check_device(rows.step, "dequantize_rows")
    r, k = rows.rows, rows.k
    out = torch.empty(r, k, dtype=torch.float32, device=rows.step.device)
    if r and k:
        block_r = 64
        grid = (triton.cdiv(r, block_r), triton.cdiv(k, TILE_K))
        _dequantize_kernel[grid](rows.codes, rows.step, out, r, k, rows.codes.stride(0), out.stride(0),
                                 1.0 / math.sqrt(HADAMARD_BLOCK), BITS=rows.bits, FIELD_BITS=rows.field_bits,
                                 ROTATE=unrotate and rows.rotated, BLOCK_R=block_r, BLOCK_K=TILE_K)
    return out


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def masked_fraction(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Share of elements with mask 0 (0-dim fp32) from a packed mask ``[R, ceil(k/8)]``; padding bits are 0."""
    kept = _POPCOUNT.to(packed.device)[packed.long()].sum()
    total = packed.shape[0] * k
    return (1.0 - kept.double() / max(total, 1)).float()
