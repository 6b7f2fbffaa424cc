"""The quantized backward's Triton kernels (bitlaw.kernels.triton.grad_gemm) against the reference
(bitlaw.kernels.gradients): gradient quantization, transposed codes, the block-scaled int8 GEMM with mask and inverse
Hadamard, stochastic rounding's bits, the whole layer, and which recipes fall back.

Runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py) or on CUDA when present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitlaw.kernels.gradients import quantize_operand, uniform_pair
from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.linear import quantized_linear, select_backend
from bitlaw.kernels.recipe import GradSpec, load_recipe
from bitlaw.kernels.triton.common import INTERPRETED

DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")
NEAREST = GradSpec("int8", "nearest", "block")
STOCHASTIC = GradSpec("int8", "stochastic", "block")


def _rows(recipe_name: str, m: int, n: int, k: int, seed: int = 0):
    from bitlaw.kernels.triton.quant import quantize_rows

    recipe = load_recipe(recipe_name)
    gen = torch.Generator().manual_seed(seed)
    x, w, g = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((m, k), (n, k), (m, n)))
    xq = quantize_rows(x, recipe.input, codes=False, packed=True)
    wq = quantize_rows(w, recipe.weight, codes=False, packed=True)
    return xq, wq, g


@pytest.mark.parametrize(("recipe_name", "m", "n", "spec"), [("quest_w4a4", 192, 320, NEAREST),
                                                              ("quest_w4a4", 192, 320, STOCHASTIC),
                                                              ("noht_w4a4", 128, 128, NEAREST)])
def test_kernels_equal_the_reference(recipe_name, m, n, spec):
    from bitlaw.kernels.triton import grad_gemm

    k = 256
    xq, wq, g = _rows(recipe_name, m, n, k)
    (q_in, s_in), (q_w, s_w) = grad_gemm.quantize_gradient(g, xq, wq, spec, spec, seed=1)
    u_w, u_x = wq.step / 2, xq.step / 2
    # The quantized operands: bitwise the reference's, the stochastic ones too (the same counter-based bits; M and
    # N are not multiples of 128: ragged blocks).
    noise_in, noise_w = uniform_pair(1, m, n) if spec.stochastic else (None, None)
    ref_in = quantize_operand(g * u_w[None, :], spec, "block", noise_in)
    ref_w = quantize_operand((g * u_x[:, None]).t(), spec, "block", None if noise_w is None else noise_w.t())
    assert q_in.dtype == torch.int8 and tuple(s_in.shape) == (m, -(-n // 128))
    assert torch.equal(q_in.float() * s_in.repeat_interleave(128, 1)[:, :n], ref_in)
    assert torch.equal(q_w.float() * s_w.repeat_interleave(128, 1)[:, :m], ref_w)
    # The transposed codes are the saved codes, transposed.
    codes_w, codes_x = grad_gemm.transposed_codes(wq), grad_gemm.transposed_codes(xq)
    assert torch.equal(codes_w.t(), wq.unpacked_codes()) and torch.equal(codes_x.t(), xq.unpacked_codes())
    # The GEMMs with the mask and the inverse rotation in the epilogue.
    gx = grad_gemm.block_scaled_gemm(q_in, s_in, codes_w, xq, torch.float32)
    gw = grad_gemm.block_scaled_gemm(q_w, s_w, codes_x, wq, torch.float32)
    unrotate = block_hadamard if xq.rotated else (lambda t: t)
    expect_x = unrotate((ref_in / u_w[None, :]) @ wq.values() * xq.unpacked_mask())
    expect_w = unrotate((ref_w / u_x[None, :]) @ xq.values() * wq.unpacked_mask())
    assert torch.allclose(gx, expect_x, rtol=1e-5, atol=1e-5 * float(expect_x.abs().max()))
    assert torch.allclose(gw, expect_w, rtol=1e-5, atol=1e-5 * float(expect_w.abs().max()))
    assert gx.dtype == torch.float32 and grad_gemm.block_scaled_gemm(q_in, s_in, codes_w, xq,
                                                                     torch.bfloat16).dtype == torch.bfloat16


def test_stochastic_rounding_in_the_kernel():
    from bitlaw.kernels.triton import grad_gemm

    xq, wq, g = _rows("quest_w4a4", 128, 256, 128)
    # Every token row the same gradient: its 128 rows are independent draws of one quantizer (one scale per block).
    g = g[:1].expand(128, -1).contiguous()
    draws = [grad_gemm.quantize_gradient(g, xq, wq, STOCHASTIC, GradSpec(), seed=seed)[0] for seed in (3, 3, 4)]
    (q3, s3), (q3_again, _), (q4, _) = draws
    assert torch.equal(q3, q3_again) and not torch.equal(q3, q4)  # seeded: reproducible, other seeds other bits
    exact = g * (wq.step / 2)[None, :] / s3.repeat_interleave(128, 1)
    low = torch.floor(exact)
    assert torch.all((q3.float() == low) | (q3.float() == low + 1))  # only the two neighbours
    assert not torch.equal(q3[0], q3[1])  # rows draw their own bits
    # Unbiased: the mean over the 128 rows is within 5 standard errors of the exact value, entry by entry.
    p = exact[0] - low[0]
    se = (p * (1 - p) / 128).sqrt().clamp_min(1e-3)
    assert ((q3.float().mean(0) - exact[0]).abs() / se).max() < 5


def test_layer_gradients_match_the_reference():
    recipe = dataclasses.replace(load_recipe("quest_w4a4_g8g8"), grad_input=NEAREST, grad_weight=NEAREST)
    gen = torch.Generator().manual_seed(4)
    x, w, g = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((2, 48, 128), (256, 128), (2, 48, 256)))
    out = {}
    for backend in ("reference", "triton"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        quantized_linear(xx, ww, recipe, backend=backend, grad_seed=torch.tensor(9)).backward(g)
        out[backend] = xx.grad, ww.grad
    for ref, tri in zip(out["reference"], out["triton"], strict=True):
        # The forward quantizers agree except on values within rounding of a boundary (tests/kernels/triton).
        assert float((ref - tri).norm() / ref.norm()) < 2e-3
    stochastic = load_recipe("quest_w4a4_g8g8")
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    quantized_linear(xx, ww, stochastic, backend="triton", grad_seed=torch.tensor(9)).backward(g)
    for ref, tri in zip(out["reference"], (xx.grad, ww.grad), strict=True):
        assert 1e-3 < float((ref - tri).norm() / ref.norm()) < 0.03  # one stochastic draw: about 1 % off


@pytest.mark.parametrize(("change", "reason"), [
    ({"grad_input": GradSpec("fp8_e4m3")}, "grad_input: gradient format 'fp8_e4m3' runs only on the reference"),
    ({"grad_weight": GradSpec("int8", scale="channel")}, "grad_weight: scale 'channel' block 128"),
    ({"grad_input": GradSpec("int8", hadamard=True)}, "grad_input: hadamard"),
])
def test_unsupported_backwards_fall_back_with_the_reason(change, reason):
    recipe = dataclasses.replace(load_recipe("quest_w4a4"), **change)
    x, w = torch.zeros(4, 128, device=DEVICE), torch.zeros(8, 128, device=DEVICE)
    choice = select_backend(recipe, x, w, "triton")
    assert choice.backend == "reference" and reason in choice.reason
    assert select_backend(load_recipe("quest_w4a4_g8g8"), x, w, "triton").backend == "triton"
