"""The int8 tensor-core GEMM of the forward pass: ``y = x̂_h ŵ_hᵀ`` from odd codes, the steps in the epilogue.

``y = (codes_x · codes_wᵀ) ⊙ (step_x/2)(step_w/2)ᵀ (+ bias)`` (docs/numerics.md §6): int8 × int8 products summed
in an int32 accumulator are exact for odd codes up to ±127, so every tile shape gives bitwise the same output.
That is why autotuning is safe across DDP ranks; its key buckets M (powers of two from 64 to 8192) so that
evaluation and generation at new sequence lengths reuse a tuned configuration instead of tuning again.
Operands are int8 codes in memory (never sub-byte fields), so the K-loop is plain vector loads that Triton
pipelines with asynchronous copies into shared memory.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

from .common import INTERPRETED, capability, check_device, pick
from .quant import QuantizedRows

OUT_DTYPES = (torch.float32, torch.bfloat16)
M_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per GPU generation, all spill-free in the static profile
# (bitlaw.benchmarks.profile). Hopper: large wgmma tiles for training shapes, 64-row tiles for short inputs. Ampere's
# mma.sync keeps operand fragments in registers, so its tiles are smaller.
GEMM_TILES = {
    90: ((128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4),
         (64, 256, 128, 8, 3)),
    80: ((128, 128, 128, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3)),
}


def _config(tile: tuple[int, int, int, int, int]) -> triton.Config:
    bm, bn, bk, warps, stages = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


GEMM_CONFIGS = [_config(tile) for tile in dict.fromkeys(t for tiles in GEMM_TILES.values() for t in tiles)]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2})


def configs_for(capability: int) -> list[triton.Config]:
    """The configurations the autotuner may select on a GPU of ``capability`` (Hopper's from 9.0 on)."""
    return [_config(tile) for tile in GEMM_TILES[90 if capability >= 90 else 80]]


def m_bucket(m: int) -> int:
    """The autotuning bucket of ``m`` rows: the smallest of :data:`M_BUCKETS` ≥ m (the largest beyond it)."""
    return next((bucket for bucket in M_BUCKETS if m <= bucket), M_BUCKETS[-1])


def _prune(configs, named_args, **kwargs):
    # This GPU generation's tiles; of those, tiles taller than the M bucket only compute padding (keep one at least).
    if not INTERPRETED:
        allowed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                   for c in configs_for(capability(named_args["cx_ptr"].device))}
        configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                          c.num_stages) in allowed]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(named_args["M_BUCKET"], 64)]
    return fitting or configs[-1:]


@triton.autotune(configs=pick(GEMM_CONFIGS, [_INTERPRETER_CONFIG]), key=["M_BUCKET", "N", "K", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemm_kernel(cx_ptr, cw_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, M_BUCKET, stride_cx, stride_cw,
                 stride_out, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    # Rows past the end wrap onto real rows (computed, never stored): the loads need no row masks.
    a_rows = cx_ptr + (rm % M).to(tl.int64)[:, None] * stride_cx
    b_cols = cw_ptr + (rn % N).to(tl.int64)[None, :] * stride_cw
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            a = tl.load(a_rows + kk[None, :])
            b = tl.load(b_cols + kk[:, None])
        else:
            a = tl.load(a_rows + kk[None, :], mask=(kk < K)[None, :], other=0)
            b = tl.load(b_cols + kk[:, None], mask=(kk < K)[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    half_sx = 0.5 * tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    half_sw = 0.5 * tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * half_sx[:, None] * half_sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def check_pair(a: QuantizedRows, b: QuantizedRows, what: str) -> None:
    """Raise unless ``a`` and ``b`` share the reduction size and the quantization domain."""
    if a.k != b.k:
        raise ValueError(f"{what}: reduction sizes differ (K={a.k} for the first operand, K={b.k} for the second)")
    if a.rotated != b.rotated:
        raise ValueError(f"{what}: one operand is Hadamard-rotated and the other is not; both must be quantized "
                         "in the same domain")
    check_device(a.step, what)


def _kernel_out_dtype(out_dtype: torch.dtype) -> torch.dtype:
    # The interpreter truncates fp32 → bf16 where the GPU rounds to nearest even: there the kernel writes fp32 and
    # torch rounds, so both give the same bf16 numbers.
    return torch.float32 if INTERPRETED else out_dtype


def quantized_matmul(xq: QuantizedRows, wq: QuantizedRows, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y [M, N] = x̂ ŵᵀ (+ bias)`` from the int8 codes of ``xq`` (``M`` rows) and ``wq`` (``N`` rows), equal ``K``.

    int8 × int8 → int32 accumulation, then ``acc · (step_x/2) · (step_w/2)`` in fp32 (+ bias; the GPU fuses the
    multiply and the add into one rounding) cast to ``out_dtype`` (fp32 or bf16). ``bias``: ``[N]``, any float dtype.
    """
    check_pair(xq, wq, "quantized_matmul")
    if xq.codes is None or wq.codes is None:
        raise ValueError("quantized_matmul: both operands need int8 codes (quantize_rows(..., codes=True))")
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
                           m, n, k, m_bucket(m), xq.codes.stride(0), wq.codes.stride(0), out.stride(0),
                           HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0)
    return out.to(out_dtype)
