"""The vendor GEMMs of the fast path (fp8 codes into torch._scaled_mm, int8 codes into torch._int_mm) and the
backward passes (dequantize, mask + inverse rotation) against exact and reference twins.

Under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py) or on CUDA when present, at small shapes that still cover
padding (K and N not multiples of 16, a single row) and several reduction steps.
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.quantizers import quantize
from bitlaw.kernels.recipe import TensorSpec
from bitlaw.kernels.triton.backward import grad_input, grad_weight, masked_rotate
from bitlaw.kernels.triton.common import INTERPRETED
from bitlaw.kernels.triton.quant import QuantizedRows, quantize_rows
from bitlaw.kernels.triton.vendor import scaled_matmul

from .test_quant import boundary_free

DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def quantized_matmul(xq: QuantizedRows, wq: QuantizedRows, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The forward GEMM as the fast path calls it: codes with half of each row's step as its scale."""
    return scaled_matmul(xq.codes, xq.step * 0.5, wq.codes, wq.step * 0.5, out_dtype, bias)


def exact_twin(xq: QuantizedRows, wq: QuantizedRows) -> torch.Tensor:
    """The same epilogue in torch on an exact int64 accumulator: ``(acc · step_x/2) · step_w/2`` in fp32."""
    acc = xq.unpacked_codes().cpu().long() @ wq.unpacked_codes().cpu().long().t()
    return acc.float() * (xq.step.cpu() * 0.5)[:, None] * (wq.step.cpu() * 0.5)[None, :]


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int) -> None:
    """``got`` equals ``want`` (same dtype) up to ``ulps`` units in the last place of that dtype."""
    spacing = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
    assert bool(((got.float() - want.float()).abs() <= ulps * spacing).all())


@pytest.mark.parametrize(("m", "k", "n", "x_bits", "w_bits"), [
    (1, 128, 64, 4, 4), (37, 256, 128, 4, 4), (100, 256, 64, 4, 4), (37, 256, 64, 1, 1), (64, 128, 128, 7, 2),
    (37, 128, 64, 3, 5), (19, 200, 70, 4, 4),
], ids=["w4a4-m1", "w4a4", "w4a4-2x1-tiles", "w1a1", "a7w2", "a3w5", "k200-n70"])
def test_gemm_equals_the_exact_integer_product(m, k, n, x_bits, w_bits):
    gen = torch.Generator().manual_seed(m + k + n + x_bits)
    x, w = torch.randn(m, k, generator=gen).to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE)
    rotation = "hadamard" if k % 128 == 0 else "none"
    xq = quantize_rows(x, TensorSpec(format=f"int{x_bits}", rotation=rotation))
    wq = quantize_rows(w, TensorSpec(format=f"int{w_bits}", rotation=rotation))
    assert xq.codes.dtype == (torch.float8_e4m3fn if x_bits <= 4 else torch.int8)
    if (x_bits <= 4) != (w_bits <= 4):  # one fp8 and one int8 operand: no vendor GEMM takes the pair
        with pytest.raises(ValueError, match="operand dtypes"):
            quantized_matmul(xq, wq)
        return
    y = quantized_matmul(xq, wq)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    want = exact_twin(xq, wq)
    assert_near_exact(y, want, xq, wq)
    bias = torch.randn(n, generator=gen).to(DEVICE)
    assert_near_exact(quantized_matmul(xq, wq, bias), want + bias.cpu(), xq, wq)
    y_bf16 = quantized_matmul(xq, wq, bias.bfloat16(), out_dtype=torch.bfloat16).cpu()
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), want + bias.bfloat16().float().cpu(), rtol=2**-8,
                               atol=2**-8 * float(want.abs().max()))


def assert_near_exact(y: torch.Tensor, want: torch.Tensor, xq: QuantizedRows, wq: QuantizedRows) -> None:
    """``y`` within float summation error of the exact product ``want``: int8 codes sum exactly (int32); the CPU's
    torch._scaled_mm multiplies the scaled values in fp32 (as the reference does), a GPU's fp8 tensor cores sum the
    exact code products in a narrower accumulator: at most ``K·2^-23`` (CPU), ``2^-12`` (GPU) of ``Σ|products|``."""
    absolute = exact_twin(QuantizedRows(xq.unpacked_codes().abs(), None, xq.step, xq.mask, xq.k, xq.bits, True),
                          QuantizedRows(wq.unpacked_codes().abs(), None, wq.step, wq.mask, wq.k, wq.bits, True))
    if xq.codes.dtype == torch.int8:
        assert_within_ulps(y.cpu(), want, ulps=2)
        return
    bound = (xq.k * 2.0**-23 if INTERPRETED else 2.0**-12) * absolute + 2.0**-22 * want.abs()
    assert bool(((y.cpu() - want).abs() <= bound).all())


def test_int32_accumulation_is_exact_for_int7_codes():
    # Steps of 2 make the epilogue the identity: y must be the integer sum itself (|sum| < 2^24, exact in fp32).
    gen = torch.Generator().manual_seed(11)
    cx = (2 * torch.randint(-64, 64, (37, 256), generator=gen) + 1).to(torch.int8)
    cw = (2 * torch.randint(-64, 64, (64, 256), generator=gen) + 1).to(torch.int8)
    cx[0] = 127  # the extreme row: 256 · 127² = 4,129,024
    cw[0] = 127

    def rows(codes: torch.Tensor) -> QuantizedRows:
        two = torch.full((codes.shape[0],), 2.0)
        return QuantizedRows(codes.to(DEVICE), None, two.to(DEVICE),
                             torch.zeros(codes.shape[0], 32, dtype=torch.uint8, device=DEVICE), 256, 7, True)

    y = quantized_matmul(rows(cx), rows(cw)).cpu()
    assert torch.equal(y, (cx.long() @ cw.long().t()).float()) and y[0, 0] == 256 * 127**2


@pytest.mark.parametrize("spec", [TensorSpec(format="int4"), TensorSpec(format="int1", grad="clip"),
                                  TensorSpec(format="int3", rotation="none")], ids=["int4", "int1", "int3-noht"])
def test_gemm_equals_the_reference_product(spec):
    x = boundary_free((37, 256), [spec], seed=21)
    w = boundary_free((64, 256), [spec], seed=22)
    y = quantized_matmul(quantize_rows(x.to(DEVICE), spec), quantize_rows(w.to(DEVICE), spec))
    xv, wv = quantize(x, spec).values, quantize(w, spec).values
    reference = xv @ wv.t()
    # The kernel's sum is exact (int32); the reference's fp32 matmul is off by at most K·u·Σ|products|.
    bound = 256 * 2.0**-24 * (xv.abs() @ wv.abs().t()) + 2.0**-23 * reference.abs()
    assert bool(((y.cpu() - reference).abs() <= bound).all())


@pytest.mark.parametrize(("m", "k", "n", "spec"), [
    (37, 256, 64, TensorSpec(format="int4")),
    (1, 128, 128, TensorSpec(format="int2")),
    (64, 256, 128, TensorSpec(format="int1", grad="clip")),
    (37, 200, 64, TensorSpec(format="int4", rotation="none")),
], ids=["int4", "int2-m1", "int1", "int4-noht-k200"])
def test_backward_kernels_equal_the_torch_twin(m, k, n, spec):
    gen = torch.Generator().manual_seed(m + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.05
    g = torch.randn(m, n, generator=gen)
    xq = quantize_rows(x.to(DEVICE), spec, codes=False, packed=True)
    wq = quantize_rows(w.to(DEVICE), spec, codes=False, packed=True)
    unrotate = block_hadamard if spec.rotated else (lambda t: t)
    want_x = unrotate(xq.unpacked_mask().cpu() * (g @ wq.values().cpu()))
    want_w = unrotate(wq.unpacked_mask().cpu() * (g.t() @ xq.values().cpu()))
    got_x, got_w = grad_input(g.to(DEVICE), xq, wq), grad_weight(g.to(DEVICE), xq, wq)
    assert got_x.shape == (m, k) and got_w.shape == (n, k)
    torch.testing.assert_close(got_x.cpu(), want_x, rtol=1e-5, atol=1e-5 * float(want_x.abs().max()))
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-5 * float(want_w.abs().max()))
    # bf16 gradients in, bf16 out (as under autocast): equal up to bf16 rounding.
    got = grad_input(g.to(DEVICE).bfloat16(), xq, wq, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), want_x, rtol=2e-2, atol=2e-2 * float(want_x.abs().max()))


def test_bad_operands_are_rejected_clearly():
    gen = torch.Generator().manual_seed(0)
    a = quantize_rows(torch.randn(8, 256, generator=gen).to(DEVICE), TensorSpec(format="int4"), packed=True)
    b = quantize_rows(torch.randn(8, 128, generator=gen).to(DEVICE), TensorSpec(format="int4"))
    c = quantize_rows(torch.randn(8, 256, generator=gen).to(DEVICE), TensorSpec(format="int4", rotation="none"))
    with pytest.raises(ValueError, match=r"a \(8, 256\), b \(8, 128\).*do not fit"):
        quantized_matmul(a, b)
    with pytest.raises(ValueError, match="out_dtype torch.float16 is not allowed"):
        quantized_matmul(a, a, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="operand dtypes torch.float32"):
        scaled_matmul(a.values(), a.step, a.codes, a.step, torch.float32)
    assert c.codes.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"grad has shape \(8, 5\), expected \(8, 256\)"):
        masked_rotate(torch.zeros(8, 5, device=DEVICE), a)
    with pytest.raises(ValueError, match="grad dtype torch.float64"):
        masked_rotate(torch.zeros(8, 256, dtype=torch.float64, device=DEVICE), a)
    with pytest.raises(ValueError, match="hold no packed codes"):
        grad_weight(torch.zeros(8, 8, device=DEVICE), b, b)
