"""What the Triton kernels share: the interpreter switch, the Hadamard matrix as a tensor, dot precisions, and the
in-kernel helpers that unpack bit fields and store with 64-bit row offsets."""

from __future__ import annotations

import functools
import os

import torch

import triton
import triton.language as tl

from ..hadamard import hadamard_matrix

HADAMARD_BLOCK = 128  # the only rotation block the kernels implement: one 128×128 tile per dot
MAX_BITS = 7  # odd codes up to ±(2^7 − 1) = ±127 fit int8; int8's ±255 do not
E4M3_BITS = 4  # odd codes up to ±15 (three mantissa bits after the leading one) are exact in fp8 e4m3
# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel: set it before importing bitlaw.kernels.triton.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# How a dot against the ±1 Hadamard matrix multiplies its other operand (the DOT constexpr of the kernels):
DOT_BF16 = 1  # bf16 operand: exact products on bf16 tensor cores, fp32 sums
DOT_SPLIT3 = 2  # fp32 operand as the sum of three bf16 parts (8 + 8 + 8 mantissa bits, exact): fp32 accuracy
DOT_IEEE = 0  # fp32 dot as it is: the interpreter's (numpy computes it in fp32; it has no bf16)


def dot_mode(dtype: torch.dtype) -> int:
    """The DOT mode for an operand of ``dtype`` (fp32 or bf16) on this machine."""
    if INTERPRETED:
        return DOT_IEEE
    return DOT_BF16 if dtype == torch.bfloat16 else DOT_SPLIT3


def signs_for(dot: int, device: torch.device) -> torch.Tensor:
    """The ±1 matrix in the dtype a DOT mode reads."""
    return hadamard_signs(torch.float32 if dot == DOT_IEEE else torch.bfloat16, device)


def pick(gpu, interpreter):
    """``gpu`` on a GPU, ``interpreter`` under ``TRITON_INTERPRET=1`` (where launches cost seconds, not µs)."""
    return interpreter if INTERPRETED else gpu


@functools.cache
def _signs(dtype: torch.dtype, device: str) -> torch.Tensor:
    # ±1 entries (the orthonormal H times sqrt(128)) are exact in bf16, so a bf16 dot with them has exact products.
    return (hadamard_matrix(HADAMARD_BLOCK, torch.float64) * HADAMARD_BLOCK**0.5).round().to(dtype).to(device)


def hadamard_signs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ±1 Sylvester matrix ``[128, 128]`` in ``dtype`` on ``device`` (cached): ``H = signs / sqrt(128)``."""
    return _signs(dtype, str(device))


def capability(device: torch.device) -> int:
    """``10·major + minor`` of the GPU holding ``device`` (90 for Hopper); 90 under the interpreter, whose launches
    take the Hopper configurations."""
    if INTERPRETED or device.type != "cuda":
        return 90
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


HOPPER_SMS = 132  # multiprocessors of an H100 SXM: what the interpreter's launches assume


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU holding ``device``; :data:`HOPPER_SMS` under the interpreter."""
    if INTERPRETED or device.type != "cuda":
        return HOPPER_SMS
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_device(x: torch.Tensor, what: str) -> None:
    """Raise unless Triton can run on ``x``'s device (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"{what}: the Triton kernels need CUDA tensors (got device {x.device}); on CPU set "
                           "TRITON_INTERPRET=1 before bitlaw.kernels.triton is imported")


@triton.jit
def dot_signs(x, signs, acc, DOT: tl.constexpr):
    """``acc + x [R, C] · signs [C, N]`` in fp32 by the DOT mode (see :func:`dot_mode`): the ±1 entries make every
    product exact, so only the fp32 sums round."""
    if DOT == 1:  # DOT_BF16
        out = tl.dot(x.to(tl.bfloat16), signs, acc)
    elif DOT == 2:  # DOT_SPLIT3
        x = x.to(tl.float32)
        high = x.to(tl.bfloat16)
        rest = x - high.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        low = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        out = tl.dot(high, signs, acc)
        out = tl.dot(mid, signs, out)
        out = tl.dot(low, signs, out)
    else:
        out = tl.dot(x.to(tl.float32), signs, acc, input_precision="ieee")
    return out


@triton.jit
def e4m3_byte(code):
    """The fp8 e4m3 (``float8_e4m3fn``) bit pattern, as int32, of each nonzero integer in ``code`` (int32,
    ``|code| ≤ 15``, all exact in e4m3): read from the integer's fp32 bits, whose exponent and top three mantissa
    bits sit together above bit 20; re-biasing the exponent from 127 to 7 is one subtraction of ``120 << 3``. Integer
    arithmetic, not a cast: the interpreter has no fp8 type."""
    bits = code.to(tl.float32).to(tl.int32, bitcast=True)
    return (((bits & 0x7FFFFFFF) >> 20) - (120 << 3)) | ((bits >> 24) & 0x80)


@triton.jit
def unpack_block(fields, FIELD_BITS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Bytes ``[ROWS, WIDTH·FIELD_BITS/8]`` (uint8 or int32) → the ``[ROWS, WIDTH]`` int32 fields they hold, first
    field in the low bits (the layout of :mod:`bitlaw.kernels.packing`)."""
    if FIELD_BITS == 8:
        out = fields.to(tl.int32)
    else:
        PER_BYTE: tl.constexpr = 8 // FIELD_BITS
        shifts = tl.arange(0, PER_BYTE) * FIELD_BITS
        spread = (fields.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << FIELD_BITS) - 1)
        out = tl.reshape(spread, [ROWS, WIDTH])
    return out


@triton.jit
def pack_pairs(fields, ROWS: tl.constexpr, WIDTH: tl.constexpr, FIELD_BITS: tl.constexpr):
    """``[ROWS, WIDTH]`` int32 fields (each < 2^FIELD_BITS) → ``[ROWS, WIDTH·FIELD_BITS/8]`` bytes as int32, first field
    in the low bits. Built from pairwise splits: each halves the width and doubles the field, so adjacent fields meet
    in registers before any data moves between threads."""
    if FIELD_BITS == 1:
        lo, hi = tl.split(tl.reshape(fields, [ROWS, WIDTH // 2, 2]))
        fields = lo | (hi << 1)
        lo, hi = tl.split(tl.reshape(fields, [ROWS, WIDTH // 4, 2]))
        fields = lo | (hi << 2)
        lo, hi = tl.split(tl.reshape(fields, [ROWS, WIDTH // 8, 2]))
        fields = lo | (hi << 4)
    elif FIELD_BITS == 2:
        lo, hi = tl.split(tl.reshape(fields, [ROWS, WIDTH // 2, 2]))
        fields = lo | (hi << 2)
        lo, hi = tl.split(tl.reshape(fields, [ROWS, WIDTH // 4, 2]))
        fields = lo | (hi << 4)
    elif FIELD_BITS == 4:
        lo, hi = tl.split(tl.reshape(fields, [ROWS, WIDTH // 2, 2]))
        fields = lo | (hi << 4)
    return fields
