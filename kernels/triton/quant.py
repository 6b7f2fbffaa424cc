"""The fused forward quantizer: block-Hadamard rotation, Gaussian RMS scale, centred rounding and trust mask.

``quantize_rows(x, spec)`` turns ``[M, K]`` fp32/bf16 rows into odd integer codes ``2q+1`` (docs/numerics.md §3), a
per-row step and the bit-packed gradient mask (docs/numerics.md §4), equal to
:func:`bitlaw.kernels.quantizers.quantize` except where a value lies within float rounding of a boundary. It writes
what its callers ask for: the odd codes as the vendor GEMM's operand (fp8 e4m3 bytes for grids of up to 4
bits, which torch._scaled_mm multiplies on fp8 tensor cores; int8 above, for torch._int_mm), the same codes packed
in the storage encoding of :mod:`bitlaw.kernels.packing` (level indices in ``field_bits(2^b)``-bit fields; what
backward keeps), or both; the mask and the step always.

How the kernel stays cheap (docs/numerics.md §6): the row's RMS is taken before rotating (the rotation is
orthonormal), so rows of up to 4096 columns (power-of-two blocks) are read once and held in registers, and longer
ones are read twice, by a first pass that only squares and adds; the ±1 Hadamard matrix is loaded once per program
from a tensor and multiplied on tensor cores (bf16 inputs: exact products, fp32 sums); the scale ``1/sqrt(128)`` and
the division by the step are one multiplication by a per-row reciprocal; fields and mask bits are packed by
pairwise splits, so neighbouring elements meet in registers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import triton
import triton.language as tl

from ..packing import field_bits, unpack_codes, unpack_mask
from ..recipe import TensorSpec
from .common import (
    E4M3_BITS,
    HADAMARD_BLOCK,
    MAX_BITS,
    capability,
    check_device,
    dot_mode,
    dot_signs,
    e4m3_byte,
    multiprocessors,
    pack_pairs,
    pick,
    signs_for,
)

TILE_K = HADAMARD_BLOCK  # columns per step of the quantizer loop: one Hadamard block


ONE_PASS_TILES = 64  # 128-column tiles per program when rows are read once: BLOCK_M · K/128 of them


def one_pass_blocks(k: int, dtype: torch.dtype, capability: int) -> int:
    """``K/128`` when the quantizer reads each row once (its tiles held in registers between the sum of squares and
    the rounding), else 0 (two passes over the row). One pass takes whole power-of-two numbers of 128-column
    blocks, at least two rows per program (``K`` of 128 … 4096) — except fp32 rows on GPUs before Hopper, whose
    three bf16 parts per value spill there (bitlaw.benchmarks.profile)."""
    blocks = k // TILE_K
    if k % TILE_K or blocks & (blocks - 1) or not 1 <= blocks <= ONE_PASS_TILES // 2:
        return 0
    return 0 if dtype == torch.float32 and capability < 90 else blocks


def launch_config(dtype: torch.dtype, capability: int, k: int = 0) -> tuple[int, int, int, int]:
    """(rows per program, warps, pipeline stages, blocks) of the quantizer for ``[M, k]`` ``dtype`` input on a GPU of
    ``capability``; ``blocks`` > 0 selects the one-pass kernel (:func:`one_pass_blocks`).

    Fixed per GPU generation, not autotuned: the kernel is bound by memory bandwidth, so the launch shape matters
    little, and a fixed one keeps every DDP rank and every sequence length on the same code. Chosen by the static
    profile (bitlaw.benchmarks.profile) to be spill-free: one pass holds 64 tiles on 4 warps; in two passes Hopper's
    wgmma reads the ±1 matrix from shared memory, while Ampere's mma.sync holds it in registers, so fp32 rows there
    go 32 at a time without pipelining.
    """
    blocks = one_pass_blocks(k, dtype, capability)
    if blocks:
        return ONE_PASS_TILES // blocks, 4, 1, blocks
    if capability >= 90:
        return 64, 4, 3, 0
    return (32, 4, 1, 0) if dtype == torch.float32 else (64, 8, 3, 0)


def column_splits(m: int, k: int, block_m: int, blocks: int, sms: int) -> int:
    """Programs per row block along the columns: 1, unless the two-pass kernel (``blocks`` 0) would launch fewer
    programs than the GPU has multiprocessors (a weight of few rows, e.g. 2048 × 5632): then enough splits of the
    row's 128-column blocks for one full wave. Each split reads its rows once more for the scale (the sum of
    squares): a small tensor read again so that every multiprocessor works."""
    rows = -(-m // block_m)
    if blocks or rows >= sms:
        return 1
    return min(-(-sms // rows), max(k // TILE_K, 1))


def launch_grid(m: int, k: int, dtype: torch.dtype, capability: int, sms: int) -> tuple[tuple[int, int], int]:
    """(grid, columns per program) of the quantizer over ``[m, k]`` ``dtype`` rows on a GPU of ``capability`` with
    ``sms`` multiprocessors: row blocks of :func:`launch_config` times the :func:`column_splits`."""
    block_m, _, _, blocks = launch_config(dtype, capability, k)
    chunk = -(-k // (column_splits(m, k, block_m, blocks, sms) * TILE_K)) * TILE_K
    return (triton.cdiv(m, block_m), triton.cdiv(k, chunk)), chunk


@triton.jit
def _round_and_store(a, inv_step, threshold, k0, codes_rows, packed_rows, mask_rows, row_ok, K,
                     BITS: tl.constexpr, FIELD_BITS: tl.constexpr, CODES: tl.constexpr, EVEN_K: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Round one tile ``a`` ``[ROWS, BLOCK_K]`` (rotated, fp32) by the per-row reciprocal step and mask threshold,
    and store its codes (``CODES``: 0 none, 1 int8, 2 fp8 e4m3 bytes), packed fields and mask bits. ``k0``: the
    tile's first column, a scalar or ``[ROWS, 1]`` (one per row when a program's tiles are pieces of several rows);
    ``*_rows``: ``[ROWS, 1]`` row pointers."""
    LOW: tl.constexpr = -(2 ** (BITS - 1))
    HIGH: tl.constexpr = 2 ** (BITS - 1) - 1
    cols = k0 + tl.arange(0, BLOCK_K)[None, :]
    ok = _tile_ok(row_ok, cols, K, EVEN_K)
    q = tl.minimum(tl.maximum(tl.floor(a * inv_step[:, None]), LOW), HIGH).to(tl.int32)
    keep = (tl.abs(a) <= threshold[:, None]).to(tl.int32)
    if not EVEN_K:
        keep = tl.where(cols < K, keep, 0)
    if CODES == 1:
        tl.store(codes_rows + cols, (2 * q + 1).to(tl.int8), mask=ok)
    elif CODES == 2:
        if BITS == 1:  # codes ±1: e4m3 0x38 with the sign of q ∈ {−1, 0}
            byte = (q & 0x80) | 0x38
        else:
            byte = e4m3_byte(2 * q + 1)
        tl.store(codes_rows + cols, byte.to(tl.uint8), mask=ok)
    if FIELD_BITS > 0:
        index = q + 2 ** (BITS - 1)  # the level index of docs/numerics.md §6
        if not EVEN_K:
            index = tl.where(cols < K, index, 0)  # the padding of a last partial byte is zero
        WIDTH: tl.constexpr = BLOCK_K * FIELD_BITS // 8
        byte_cols = k0 * FIELD_BITS // 8 + tl.arange(0, WIDTH)[None, :]
        tl.store(packed_rows + byte_cols, pack_pairs(index, ROWS, BLOCK_K, FIELD_BITS).to(tl.uint8),
                 mask=row_ok[:, None] & (byte_cols < tl.cdiv(K * FIELD_BITS, 8)))
    mask_cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
    tl.store(mask_rows + mask_cols, pack_pairs(keep, ROWS, BLOCK_K, 1).to(tl.uint8),
             mask=row_ok[:, None] & (mask_cols < tl.cdiv(K, 8)))


@triton.jit
def _row_scales(sum_squares, K, gaussian_scale, mask_coef, inv_sqrt_block, BITS: tl.constexpr, ROTATE: tl.constexpr):
    """(step, reciprocal step, mask threshold) per row from its sum of squares, in the reference's operation
    order: α = c·sqrt(mean), floored; step = 2α/(2^b − 1). With the rotation, the dot sums ±x (H·sqrt(128)), so
    1/sqrt(128) is folded into the reciprocal and the threshold."""
    mean_square = tl.math.div_rn(sum_squares, tl.full(sum_squares.shape, 1.0, tl.float32) * K)
    alpha = tl.maximum(gaussian_scale * tl.sqrt_rn(mean_square), 1.1754943508222875e-38)
    step = tl.math.div_rn(2.0 * alpha, tl.full(sum_squares.shape, 2**BITS - 1, tl.float32))
    # An all-zero row has the floored α and a subnormal step whose reciprocal would overflow; a step floored at
    # 2^-100 for the reciprocal alone still rounds its zeros to q = 0, as the reference's division does.
    SAFE: tl.constexpr = 7.888609052210118e-31
    if ROTATE:
        inv_step = tl.math.div_rn(tl.full(sum_squares.shape, 1.0, tl.float32) * inv_sqrt_block,
                                  tl.maximum(step, SAFE))
        threshold = mask_coef * alpha / inv_sqrt_block
    else:
        inv_step = tl.math.div_rn(tl.full(sum_squares.shape, 1.0, tl.float32), tl.maximum(step, SAFE))
        threshold = mask_coef * alpha
    return step, inv_step, threshold


@triton.jit
def _tile_ok(row_ok, cols, K, EVEN_K: tl.constexpr):
    """The mask of a ``[rows, 128]`` tile whose columns are ``cols`` (``[1 or rows, 128]``): its rows, and its
    columns unless ``K`` is a multiple of 128."""
    if EVEN_K:
        ok = row_ok[:, None]
    else:
        ok = row_ok[:, None] & (cols < K)
    return ok


@triton.jit
def _rows_at(ptr, first, local, stride):
    """Row pointers ``[n, 1]``: a 64-bit base per program and 32-bit offsets within its rows (a program spans at most
    64 rows, so ``local·stride`` stays below 2^31 for rows under 2^25 elements): sizes never overflow, and no
    register holds a 64-bit address per row."""
    return ptr + first.to(tl.int64) * stride + (local * stride)[:, None]


@triton.jit
def _per_tile(v, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    """A per-row ``[BLOCK_M]`` vector repeated for each of the row's ``BLOCKS`` tiles: ``[BLOCK_M·BLOCKS]``."""
    return tl.reshape(tl.broadcast_to(v[:, None], [BLOCK_M, BLOCKS]), [BLOCK_M * BLOCKS])


@triton.jit
def _quantize_kernel(x_ptr, signs_ptr, codes_ptr, packed_ptr, mask_ptr, step_ptr, M, K, stride_x, stride_codes,
                     stride_packed, stride_mask, gaussian_scale, mask_coef, inv_sqrt_block, chunk,
                     BITS: tl.constexpr, FIELD_BITS: tl.constexpr, CODES: tl.constexpr, ROTATE: tl.constexpr,
                     EVEN_K: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    first = tl.program_id(0) * BLOCK_M
    offs = tl.arange(0, BLOCK_K)
    if BLOCKS > 0:
        # One pass (K = BLOCKS·128): the program's BLOCK_M rows are read once, as BLOCK_M·BLOCKS tiles of 128
        # columns; the sums of squares, the rotation and the rounding all work on the tiles in registers.
        TILES: tl.constexpr = BLOCK_M * BLOCKS
        tile = tl.arange(0, TILES)
        local = tile // BLOCKS
        k0 = ((tile % BLOCKS) * BLOCK_K)[:, None]
        tile_ok = first + local < M
        x = tl.load(_rows_at(x_ptr, first, local, stride_x) + k0 + offs[None, :], mask=tile_ok[:, None], other=0.0)
        xf = x.to(tl.float32)
        sum_squares = tl.sum(tl.reshape(tl.sum(xf * xf, axis=1), [BLOCK_M, BLOCKS]), axis=1)
        step, inv_step, threshold = _row_scales(sum_squares, K, gaussian_scale, mask_coef, inv_sqrt_block, BITS,
                                                ROTATE)
        rows = first + tl.arange(0, BLOCK_M)
        tl.store(step_ptr + rows, step, mask=rows < M)
        if ROTATE:
            signs = tl.load(signs_ptr + offs[:, None] * BLOCK_K + offs[None, :])
            a = dot_signs(x, signs, tl.zeros([TILES, BLOCK_K], dtype=tl.float32), DOT)
        else:
            a = xf
        _round_and_store(a, _per_tile(inv_step, BLOCK_M, BLOCKS), _per_tile(threshold, BLOCK_M, BLOCKS), k0,
                         _rows_at(codes_ptr, first, local, stride_codes),
                         _rows_at(packed_ptr, first, local, stride_packed),
                         _rows_at(mask_ptr, first, local, stride_mask), tile_ok, K,
                         BITS, FIELD_BITS, CODES, True, TILES, BLOCK_K)
    else:
        local = tl.arange(0, BLOCK_M)
        rows = first + local
        row_ok = rows < M
        x_rows = _rows_at(x_ptr, first, local, stride_x)
        # Pass 1: the row's sum of squares, accumulated elementwise and reduced once (no shuffles in the loop).
        squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs
            ok = _tile_ok(row_ok, cols[None, :], K, EVEN_K)
            x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            squares += x * x
        step, inv_step, threshold = _row_scales(tl.sum(squares, axis=1), K, gaussian_scale, mask_coef,
                                                inv_sqrt_block, BITS, ROTATE)
        # Programs along axis 1 split the row's columns (``chunk`` each, whole 128-column blocks) for the second
        # pass, so that tensors with few rows still fill the GPU; each computed the whole row's scale.
        k_lo = tl.program_id(1) * chunk
        k_hi = tl.minimum(K, k_lo + chunk)
        if tl.program_id(1) == 0:
            tl.store(step_ptr + rows, step, mask=row_ok)
        if ROTATE:
            # fp32 rows are multiplied in two halves of the block (rows of H split in two): the three bf16 parts
            # of a half stay in registers where those of the whole block would spill.
            HALF: tl.constexpr = BLOCK_K // 2
            half = tl.arange(0, HALF)
            if DOT == 2:
                signs_top = tl.load(signs_ptr + half[:, None] * BLOCK_K + offs[None, :])
                signs_bottom = tl.load(signs_ptr + (HALF + half)[:, None] * BLOCK_K + offs[None, :])
            else:
                signs = tl.load(signs_ptr + offs[:, None] * BLOCK_K + offs[None, :])
        codes_rows = _rows_at(codes_ptr, first, local, stride_codes)
        packed_rows = _rows_at(packed_ptr, first, local, stride_packed)
        mask_rows = _rows_at(mask_ptr, first, local, stride_mask)
        # Pass 2: rotate, round and store, block by block.
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + offs
            ok = _tile_ok(row_ok, cols[None, :], K, EVEN_K)
            if ROTATE and DOT == 2:
                a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                a = dot_signs(tl.load(x_rows + (k0 + half)[None, :], mask=row_ok[:, None], other=0.0), signs_top, a,
                              DOT)
                a = dot_signs(tl.load(x_rows + (k0 + HALF + half)[None, :], mask=row_ok[:, None], other=0.0),
                              signs_bottom, a, DOT)
            elif ROTATE:
                x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0)
                a = dot_signs(x, signs, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), DOT)
            else:
                a = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            _round_and_store(a, inv_step, threshold, k0, codes_rows, packed_rows, mask_rows, row_ok, K, BITS,
                             FIELD_BITS, CODES, EVEN_K, BLOCK_M, BLOCK_K)


@dataclass(frozen=True)
class QuantizedRows:
    """Rows quantized by :func:`quantize_rows`, in the rotated domain when ``rotated``.

    codes:  ``[R, K]`` odd codes ``2q+1`` as the GEMM's operand: fp8 e4m3 for grids of up to 4 bits, int8 above
            (:func:`code_dtype`); None when not asked for.
    packed: ``[R, ceil(K·field_bits(2^bits)/8)]`` uint8 level-index fields (:mod:`bitlaw.kernels.packing`), or None.
    step:   ``[R]`` fp32, ``2α/(2^bits − 1)``; values are ``(2q+1) · step/2``.
    mask:   ``[R, ceil(K/8)]`` uint8, one bit per element, set where the gradient flows.
    """

    codes: torch.Tensor | None
    packed: torch.Tensor | None
    step: torch.Tensor
    mask: torch.Tensor
    k: int
    bits: int
    rotated: bool

    @property
    def rows(self) -> int:
        return self.step.shape[0]

    @property
    def field_bits(self) -> int:
        """Bits per packed field: ``field_bits(2^bits)``."""
        return field_bits(2**self.bits)

    def without_codes(self) -> QuantizedRows:
        """The same rows keeping only what backward needs (packed codes, step, mask)."""
        return QuantizedRows(None, self.packed, self.step, self.mask, self.k, self.bits, self.rotated)

    def nbytes(self) -> int:
        """Bytes held by the tensors present."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.packed, self.step, self.mask)
                   if t is not None)

    def unpacked_codes(self) -> torch.Tensor:
        """Odd codes ``[R, K]`` int8 (from ``codes``, else unpacked from ``packed``)."""
        if self.codes is None:
            return unpack_codes(self.packed, self.bits, self.k)
        return self.codes.float().to(torch.int8) if self.codes.dtype != torch.int8 else self.codes

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


def code_dtype(bits: int) -> torch.dtype:
    """The dtype of the GEMM operand codes of ``bits``-bit grids: fp8 e4m3 up to :data:`E4M3_BITS` bits (exact
    there, and what torch._scaled_mm multiplies on fp8 tensor cores), int8 above (torch._int_mm)."""
    return torch.float8_e4m3fn if bits <= E4M3_BITS else torch.int8


def quantize_rows(x: torch.Tensor, spec: TensorSpec, codes: bool = True, packed: bool = False,
                  int8: bool = False) -> QuantizedRows:
    """Quantize each row of ``x`` ``[M, K]`` (fp32/bf16) by ``spec`` in one fused kernel. See :class:`QuantizedRows`.

    ``spec`` must be an ``int1 … int7`` format with ``gaussian_rms`` scale and Hadamard block 128 (or no rotation);
    when rotated ``K`` must be a multiple of 128. ``codes``/``packed`` choose which code tensors are written (at
    least one); codes are fp8 e4m3 for grids of up to 4 bits, int8 above (:func:`code_dtype`) or when ``int8`` (the
    other GEMM operand's codes are int8).
    """
    return quantize_row_groups([x], spec, codes, packed, int8)


def quantize_row_groups(tensors: Sequence[torch.Tensor], spec: TensorSpec, codes: bool = True,
                        packed: bool = False, int8: bool = False) -> QuantizedRows:
    """:func:`quantize_rows` of the rows of ``tensors`` (each ``[R_i, K]``, one ``K``) stacked in order, written
    straight into one ``[ΣR_i, …]`` set of outputs (no concatenated copy of the inputs): each row is quantized on
    its own, so this equals quantizing ``torch.cat(tensors)``. The operand of a GEMM against several weights at
    once (q, k and v of one attention layer)."""
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"quantize_rows: {reason}; use bitlaw.kernels.quantizers.quantize for this spec")
    if not (codes or packed):
        raise ValueError("quantize_rows: ask for codes, packed codes or both")
    if not tensors:
        raise ValueError("quantize_rows: no tensors to quantize")
    tensors = [check_rows(x, "quantize_rows: x") for x in tensors]
    k = tensors[0].shape[1]
    if any(x.shape[1] != k for x in tensors):
        raise ValueError(f"quantize_rows: the tensors have different row lengths {[x.shape[1] for x in tensors]}; "
                         "a group shares one K")
    if spec.rotated and k % HADAMARD_BLOCK:
        raise ValueError(f"quantize_rows: K={k} is not a multiple of the Hadamard block {HADAMARD_BLOCK} "
                         f"(x has shape {tuple(tensors[0].shape)}); allowed: K = 128·n, or rotation: none")
    m = sum(x.shape[0] for x in tensors)
    bits = spec.fmt.bits
    width = field_bits(2**bits)
    device = tensors[0].device
    fp8 = code_dtype(bits) == torch.float8_e4m3fn and not int8
    # fp8 codes are written as their bytes (the interpreter has no fp8 type) and viewed as e4m3 afterwards.
    out_codes = torch.empty(m, k, dtype=torch.uint8 if fp8 else torch.int8, device=device) if codes else None
    out_packed = torch.empty(m, -(-k * width // 8), dtype=torch.uint8, device=device) if packed else None
    step = torch.empty(m, dtype=torch.float32, device=device)
    mask = torch.empty(m, -(-k // 8), dtype=torch.uint8, device=device)
    first = 0
    for x in tensors:
        rows = slice(first, first + x.shape[0])
        first = rows.stop
        if x.shape[0] and k:
            _launch(x, spec, out_codes[rows] if codes else None, out_packed[rows] if packed else None, step[rows],
                    mask[rows], 2 if fp8 else 1)
    if codes and fp8:
        out_codes = out_codes.view(torch.float8_e4m3fn)
    return QuantizedRows(out_codes, out_packed, step, mask, k, bits, spec.rotated)


def _launch(x: torch.Tensor, spec: TensorSpec, out_codes: torch.Tensor | None, out_packed: torch.Tensor | None,
            step: torch.Tensor, mask: torch.Tensor, code_format: int) -> None:
    """One launch of the quantizer over ``x`` ``[M, K]`` into the given outputs (row slices are fine)."""
    m, k = x.shape
    dot = dot_mode(x.dtype)
    signs = signs_for(dot, x.device)
    block_m, warps, stages, blocks = launch_config(x.dtype, capability(x.device), k)
    grid, chunk = launch_grid(m, k, x.dtype, capability(x.device), multiprocessors(x.device))
    codes, packed = out_codes is not None, out_packed is not None
    # Unwritten outputs get a valid dummy pointer; the kernel never touches it (CODES / FIELD_BITS = 0).
    _quantize_kernel[grid](
        x, signs, out_codes if codes else step, out_packed if packed else step, mask, step, m, k, x.stride(0),
        out_codes.stride(0) if codes else 0, out_packed.stride(0) if packed else 0, mask.stride(0),
        spec.gaussian_scale, spec.mask_threshold * spec.fmt.max_level, 1.0 / math.sqrt(HADAMARD_BLOCK), chunk,
        BITS=spec.fmt.bits, FIELD_BITS=field_bits(2**spec.fmt.bits) if packed else 0,
        CODES=code_format if codes else 0, ROTATE=spec.rotated, EVEN_K=k % TILE_K == 0, DOT=dot, BLOCK_M=block_m,
        BLOCKS=blocks, num_warps=pick(warps, 4), num_stages=stages)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def masked_fraction(packed_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Share of elements with mask 0 (0-dim fp32) from a packed mask ``[R, ceil(k/8)]``; padding bits are 0."""
    kept = _POPCOUNT.to(packed_mask.device)[packed_mask.long()].sum()
    total = packed_mask.shape[0] * k
    return (1.0 - kept.double() / max(total, 1)).float()
