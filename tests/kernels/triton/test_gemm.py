"""The int8 GEMM and the fused mask + inverse-rotation backward kernels against exact and reference twins.

Under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py) or on CUDA when present, at small shapes that still cover
partial tiles (odd M, N not a multiple of the tile) and several reduction steps.
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.quantizers import quantize
from bitlaw.kernels.recipe import TensorSpec
from bitlaw.kernels.triton import quant as triton_quant
from bitlaw.kernels.triton.gemm import grad_input, grad_weight, masked_rotated_grad, quantized_matmul
from bitlaw.kernels.triton.quant import PackedRows, quantize_rows

from .test_quant import boundary_free

DEVICE = "cpu" if triton_quant.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (triton_quant.INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def exact_twin(xq: PackedRows, wq: PackedRows) -> torch.Tensor:
    """The same epilogue in torch on an exact int64 accumulator: ``(acc · step_x/2) · step_w/2`` in fp32."""
    acc = xq.unpacked_codes().cpu().long() @ wq.unpacked_codes().cpu().long().t()
    return acc.float() * (xq.step.cpu() * 0.5)[:, None] * (wq.step.cpu() * 0.5)[None, :]


@pytest.mark.parametrize(("m", "k", "n", "x_bits", "w_bits", "pack"), [
    (1, 128, 64, 4, 4, True), (37, 256, 128, 4, 4, True), (100, 256, 64, 4, 4, False), (37, 256, 64, 1, 1, True),
    (64, 128, 128, 7, 2, True), (37, 128, 64, 3, 5, True),
], ids=["w4a4-m1", "w4a4-nibbles", "w4a4-int8-2x1-tiles", "w1a1-bits", "a7w2", "a3w5"])
def test_gemm_equals_the_exact_integer_product(m, k, n, x_bits, w_bits, pack):
    gen = torch.Generator().manual_seed(m + k + n + x_bits)
    x, w = torch.randn(m, k, generator=gen).to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE)
    xq = quantize_rows(x, TensorSpec(format=f"int{x_bits}"), pack=pack)
    wq = quantize_rows(w, TensorSpec(format=f"int{w_bits}"), pack=pack)
    y = quantized_matmul(xq, wq)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.equal(y.cpu(), exact_twin(xq, wq))
    bias = torch.randn(n, generator=gen).to(DEVICE)
    y_bf16 = quantized_matmul(xq, wq, bias, out_dtype=torch.bfloat16)
    assert torch.equal(y_bf16.cpu(), (exact_twin(xq, wq) + bias.cpu()).to(torch.bfloat16))


def test_int32_accumulation_is_exact_for_int7_codes():
    # Steps of 2 make the epilogue the identity: y must be the integer sum itself (|sum| < 2^24, exact in fp32).
    gen = torch.Generator().manual_seed(11)
    cx = (2 * torch.randint(-64, 64, (37, 256), generator=gen) + 1).to(torch.int8)
    cw = (2 * torch.randint(-64, 64, (64, 256), generator=gen) + 1).to(torch.int8)
    cx[0] = 127  # the extreme row: 256 · 127² = 4,129,024
    cw[0] = 127

    def rows(codes: torch.Tensor) -> PackedRows:
        two = torch.full((codes.shape[0],), 2.0)
        return PackedRows(codes.to(DEVICE), two.to(DEVICE), torch.zeros(codes.shape[0], 32, dtype=torch.uint8,
                                                                         device=DEVICE), 256, 7, False, True)

    y = quantized_matmul(rows(cx), rows(cw)).cpu()
    assert torch.equal(y, (cx.long() @ cw.long().t()).float()) and y[0, 0] == 256 * 127**2


@pytest.mark.parametrize("spec", [TensorSpec(format="int4"), TensorSpec(format="int1", grad="clip"),
                                  TensorSpec(format="int3", rotation="none")], ids=["int4", "int1", "int3-noht"])
def test_gemm_equals_the_reference_product(spec):
    x = boundary_free((37, 256), [spec], seed=21)
    w = boundary_free((64, 256), [spec], seed=22)
    y = quantized_matmul(quantize_rows(x.to(DEVICE), spec, pack=True), quantize_rows(w.to(DEVICE), spec, pack=True))
    reference = quantize(x, spec).values @ quantize(w, spec).values.t()
    torch.testing.assert_close(y.cpu(), reference, rtol=1e-5, atol=1e-5)


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
    xq, wq = quantize_rows(x.to(DEVICE), spec, pack=True), quantize_rows(w.to(DEVICE), spec, pack=True)
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
    a = quantize_rows(torch.randn(8, 256, generator=gen).to(DEVICE), TensorSpec(format="int4"))
    b = quantize_rows(torch.randn(8, 128, generator=gen).to(DEVICE), TensorSpec(format="int4"))
    c = quantize_rows(torch.randn(8, 256, generator=gen).to(DEVICE), TensorSpec(format="int4", rotation="none"))
    with pytest.raises(ValueError, match="reduction sizes differ"):
        quantized_matmul(a, b)
    with pytest.raises(ValueError, match="same domain"):
        quantized_matmul(a, c)
    with pytest.raises(ValueError, match="out_dtype=torch.float16 is not allowed"):
        quantized_matmul(a, a, out_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(8,\)"):
        quantized_matmul(a, a, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"grad has shape \(8, 5\), expected \(8, 8\)"):
        masked_rotated_grad(torch.zeros(8, 5, device=DEVICE), a, a)
    with pytest.raises(ValueError, match="grad dtype torch.float64"):
        masked_rotated_grad(torch.zeros(8, 8, dtype=torch.float64, device=DEVICE), a, a)
