"""The GEMMs of the fast path, on the vendor's libraries (cuBLAS / CUTLASS through PyTorch), never hand-written.

The quantized operands are integer codes with one scale per row: ``A = diag(s_a)·C_a`` ``[M, K]`` and
``B = diag(s_b)·C_b`` ``[N, K]``, so ``A·Bᵀ = diag(s_a)·(C_a·C_bᵀ)·diag(s_b)``: the code product is exact on
integer-valued operands and both scales fit a row-wise epilogue.

- fp8 e4m3 codes (odd codes of grids up to 4 bits, exact in e4m3; fp8 gradients) go to ``torch._scaled_mm`` with
  row-wise scales ``(M, 1)`` and ``(1, N)``: on Hopper a pipelined, warp-specialized fp8 GEMM at twice the bf16
  rate, accumulating in fp32; on the CPU build the same semantics, which is what the tests check.
- int8 codes (grids of 5 to 7 bits) go to ``torch._int_mm`` (exact int32 sums), scaled in one elementwise pass.

Shapes: ``torch._scaled_mm`` on CUDA takes inner and output dimensions that are multiples of 16 and ``torch._int_mm``
more than 16 rows and dimensions that are multiples of 8; other shapes are padded with zero codes (which add
nothing to the sums) and the output is cut back. The second operand is passed as the transpose of a row-major
``[N, K]`` tensor: the column-major layout both functions expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN = 16  # the dimension multiple both vendor GEMMs accept on CUDA
MIN_INT_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.float32, torch.bfloat16)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` ``[R, C]`` padded with zeros to ``[rows, cols]`` (itself when no padding is needed)."""
    if t.shape == (rows, cols):
        return t
    if t.dtype in FP8_DTYPES:  # F.pad has no fp8 kernels: pad the bytes (0x00 is +0 in both fp8 formats)
        return F.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0])).view(t.dtype)
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def scaled_matmul(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor | None,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``diag(scale_a)·a·bᵀ·diag(scale_b) (+ bias)`` ``[M, N]`` in ``out_dtype`` (fp32 or bf16).

    a: ``[M, K]`` codes, b: ``[N, K]`` codes, both fp8 (e4m3 or e5m2, any pairing but e5m2 × e5m2) or both int8,
    row-major; scale_a ``[M]``, scale_b ``[N]`` fp32 (None: ones); bias ``[N]`` or None.
    """
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or scale_a.shape != (m,) or (scale_b is not None and scale_b.shape != (n,)):
        raise ValueError(f"scaled_matmul: a {tuple(a.shape)}, b {tuple(b.shape)}, scale_a {tuple(scale_a.shape)} "
                         f"and scale_b {None if scale_b is None else tuple(scale_b.shape)} do not fit; expected "
                         "a [M, K], b [N, K], scale_a [M], scale_b [N]")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"scaled_matmul: out_dtype {out_dtype} is not allowed; allowed: torch.float32, "
                         "torch.bfloat16")
    if scale_b is None:
        scale_b = torch.ones(n, dtype=torch.float32, device=a.device)
    if a.dtype in FP8_DTYPES and b.dtype in FP8_DTYPES:
        # A bf16 bias with bf16 output rides in the GEMM's epilogue (cuBLAS takes no other bias with fp8 inputs).
        fused = bias is not None and bias.dtype == out_dtype == torch.bfloat16
        y = _fp8_matmul(a, scale_a, b, scale_b, out_dtype, bias if fused else None)
        bias = None if fused else bias
    elif a.dtype == torch.int8 and b.dtype == torch.int8:
        y = _int_matmul(a, scale_a, b, scale_b)
    else:
        raise ValueError(f"scaled_matmul: operand dtypes {a.dtype} and {b.dtype} are not allowed; allowed: both "
                         "int8, or both fp8 (float8_e4m3fn / float8_e5m2)")
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def _fp8_matmul(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
                out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    kp, np_ = _up(k, ALIGN), _up(n, ALIGN)
    a, b = _pad_to(a, m, kp), _pad_to(b, np_, kp)
    if np_ != n:
        scale_b = F.pad(scale_b, (0, np_ - n))
        bias = None if bias is None else F.pad(bias, (0, np_ - n))
    y = torch._scaled_mm(a, b.t(), scale_a=scale_a.float().reshape(m, 1).contiguous(),
                         scale_b=scale_b.float().reshape(1, np_).contiguous(), bias=bias, out_dtype=out_dtype)
    return y if np_ == n else y[:, :n]


def _int_matmul(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    mp, kp, np_ = max(m, MIN_INT_ROWS), _up(k, ALIGN), _up(n, ALIGN)
    acc = torch._int_mm(_pad_to(a, mp, kp), _pad_to(b, np_, kp).t())[:m, :n]
    return acc.float() * scale_a.float()[:, None] * scale_b.float()[None, :]
