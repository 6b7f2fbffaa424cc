"""The quantized backward's Triton kernels (bitlaw.kernels.triton.grad_gemm) against the reference
(bitlaw.kernels.gradients): row-wise gradient quantization to fp8 e4m3 / e5m2 and int8, transposed codes, the vendor
GEMMs with mask and inverse Hadamard after them, stochastic rounding's bits, the whole layer, and which recipes fall
back.

Runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py) or on CUDA when present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitlaw.kernels.gradients import GRIDS, grid_spacing, quantize_operand, uniform_pair
from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.linear import quantized_linear, select_backend
from bitlaw.kernels.recipe import GradSpec, load_recipe
from bitlaw.kernels.triton.common import INTERPRETED

DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")
FORMATS = ["fp8_e4m3", "fp8_e5m2", "int8"]
STOCHASTIC_E4M3 = GradSpec("fp8_e4m3", "stochastic", "token")


def _specs(fmt: str, rounding: str) -> tuple[GradSpec, GradSpec]:
    """The row-wise specs of both GEMMs: one scale per token for grad_input, per channel for grad_weight."""
    return GradSpec(fmt, rounding, "token"), GradSpec(fmt, rounding, "channel")


def _rows(recipe_name: str, m: int, n: int, k: int, seed: int = 0):
    from bitlaw.kernels.triton.quant import quantize_rows

    recipe = load_recipe(recipe_name)
    gen = torch.Generator().manual_seed(seed)
    x, w, g = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((m, k), (n, k), (m, n)))
    xq = quantize_rows(x, recipe.input, codes=False, packed=True)
    wq = quantize_rows(w, recipe.weight, codes=False, packed=True)
    return xq, wq, g


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("recipe_name", "m", "n"), [("quest_w4a4", 192, 320), ("noht_w4a4", 128, 128)])
def test_kernels_equal_the_reference(recipe_name, m, n, fmt, rounding):
    from bitlaw.kernels.triton import grad_gemm

    k = 256
    spec_in, spec_w = _specs(fmt, rounding)
    xq, wq, g = _rows(recipe_name, m, n, k)
    (q_in, s_in), (q_w, s_w) = grad_gemm.quantize_gradient(g, xq, wq, spec_in, spec_w, seed=1)
    u_w, u_x = wq.step / 2, xq.step / 2
    # The quantized operands: bitwise the reference's, the stochastic ones too (the same counter-based bits; M and
    # N are not multiples of 128: ragged tiles).
    noise_in, noise_w = uniform_pair(1, m, n) if spec_in.stochastic else (None, None)
    ref_in = quantize_operand(g * u_w[None, :], spec_in, "row", noise_in)
    ref_w = quantize_operand((g * u_x[:, None]).t(), spec_w, "row", None if noise_w is None else noise_w.t())
    assert q_in.dtype == grad_gemm.GRAD_DTYPES[fmt] and tuple(s_in.shape) == (m,) and tuple(s_w.shape) == (n,)
    assert torch.equal(q_in.float() * s_in[:, None], ref_in)
    assert torch.equal(q_w.float() * s_w[:, None], ref_w)
    # The transposed codes are the saved codes, transposed, in the GEMM's operand dtype.
    fp8 = fmt != "int8"
    codes_w = grad_gemm.transposed_codes(wq, fp8=fp8)
    assert codes_w.dtype == (torch.float8_e4m3fn if fp8 else torch.int8)
    assert torch.equal(codes_w.float().t(), wq.unpacked_codes().float())
    # The GEMMs with the mask and the inverse rotation after them.
    gx = grad_gemm.quantized_grad_gemm((q_in, s_in), wq, xq, torch.float32, torch.float32)
    gw = grad_gemm.quantized_grad_gemm((q_w, s_w), xq, wq, torch.float32, torch.float32)
    unrotate = block_hadamard if xq.rotated else (lambda t: t)
    expect_x = unrotate((ref_in / u_w[None, :]) @ wq.values() * xq.unpacked_mask())
    expect_w = unrotate((ref_w / u_x[None, :]) @ xq.values() * wq.unpacked_mask())
    torch.testing.assert_close(gx, expect_x, rtol=1e-5, atol=1e-5 * float(expect_x.abs().max()))
    torch.testing.assert_close(gw, expect_w, rtol=1e-5, atol=1e-5 * float(expect_w.abs().max()))
    bf16 = grad_gemm.quantized_grad_gemm((q_in, s_in), wq, xq, torch.bfloat16, torch.bfloat16)
    assert gx.dtype == torch.float32 and bf16.dtype == torch.bfloat16


def test_fp8_bytes_are_torchs_encoding_of_the_rounded_values():
    """The kernel writes fp8 bit patterns itself (the interpreter has no fp8 type): every one is torch's encoding
    of the value the reference rounds to, subnormals, the largest value and zero included."""
    from bitlaw.kernels.triton import grad_gemm

    xq, wq, g = _rows("quest_w4a4", 64, 128, 128)
    g[0, :8] = torch.tensor([0.0, 1e-30, -1e-30, 3.0, -3.0, 1e-3, 1e-4, -1e-5]) * float(g.abs().max())
    for fmt, torch_dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        spec_in, _ = _specs(fmt, "nearest")
        (q, scale), _ = grad_gemm.quantize_gradient(g, xq, wq, spec_in, GradSpec(), seed=0)
        values = q.float()
        assert torch.equal(q.view(torch.uint8), values.to(torch_dtype).view(torch.uint8))
        assert float(values.abs().max()) == GRIDS[fmt].largest and bool((values == 0).any())


def test_stochastic_rounding_in_the_kernel():
    from bitlaw.kernels.triton import grad_gemm

    xq, wq, g = _rows("quest_w4a4", 128, 256, 128)
    # Every token row the same gradient: its 128 rows are independent draws of one quantizer (one scale per row).
    g = g[:1].expand(128, -1).contiguous()
    draws = [grad_gemm.quantize_gradient(g, xq, wq, STOCHASTIC_E4M3, GradSpec(), seed=seed)[0]
             for seed in (3, 3, 4)]
    (q3, s3), (q3_again, _), (q4, _) = draws
    q3, q3_again, q4 = q3.float(), q3_again.float(), q4.float()
    assert torch.equal(q3, q3_again) and not torch.equal(q3, q4)  # seeded: reproducible, other seeds other bits
    exact = g * (wq.step / 2)[None, :] / s3[:, None]
    spacing = grid_spacing(exact, GRIDS["fp8_e4m3"])
    low = torch.floor(exact / spacing) * spacing
    assert torch.all((q3 == low) | (q3 == low + spacing))  # only the two neighbours
    assert not torch.equal(q3[0], q3[1])  # rows draw their own bits
    # Unbiased: the mean over the 128 rows is within 5 standard errors of the exact value, entry by entry.
    q3, exact, low = q3 / spacing, exact / spacing, low / spacing
    p = exact[0] - low[0]
    se = (p * (1 - p) / 128).sqrt().clamp_min(1e-3)
    assert ((q3.float().mean(0) - exact[0]).abs() / se).max() < 5


def test_layer_gradients_match_the_reference():
    spec_in, spec_w = _specs("fp8_e4m3", "nearest")
    recipe = dataclasses.replace(load_recipe("quest_w4a4_g8g8"), grad_input=spec_in, grad_weight=spec_w)
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
        assert 1e-3 < float((ref - tri).norm() / ref.norm()) < 0.08  # one stochastic draw of e4m3: about 4 % off


@pytest.mark.parametrize(("change", "reason"), [
    ({"grad_input": GradSpec("fp8_e4m3")}, "grad_input: scale 'block'"),
    ({"grad_weight": GradSpec("int8", scale="token")}, "grad_weight: scale 'token'"),
    ({"grad_input": GradSpec("fp8_e4m3", scale="token", hadamard=True)}, "grad_input: hadamard"),
])
def test_unsupported_backwards_fall_back_with_the_reason(change, reason):
    recipe = dataclasses.replace(load_recipe("quest_w4a4"), **change)
    x, w = torch.zeros(4, 128, device=DEVICE), torch.zeros(8, 128, device=DEVICE)
    choice = select_backend(recipe, x, w, "triton")
    assert choice.backend == "reference" and reason in choice.reason
    assert select_backend(load_recipe("quest_w4a4_g8g8"), x, w, "triton").backend == "triton"
