"""The Triton kernels at the 800M layer shapes on CUDA (``pytest -m gpu``; deselected by default).

Same contracts as the interpreter tests, at real sizes: quantizer codes/steps/masks vs the reference (only
values within the float error of the block sums of a boundary may differ), the fp8 GEMM (torch._scaled_mm) equal
to an exact float64 twin (within the accumulator precision of fp8 tensor cores; one bf16 unit with a bias),
the backward vs a float64 twin within the precision of its GEMM (bf16 inputs: bf16 products, fp32 sums), the whole
layer vs the reference path, and a few training steps with either backend on the GPU trainer. Under
``TRITON_INTERPRET=1`` without CUDA the same tests run at small shapes, which is how their logic is checked on
machines without a GPU (``TRITON_INTERPRET=1 pytest -m gpu tests/kernels/triton/test_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.linear import quantized_linear
from bitlaw.kernels.recipe import TensorSpec, load_recipe
from bitlaw.kernels.triton.backward import grad_input, grad_weight
from bitlaw.kernels.triton.common import INTERPRETED
from bitlaw.kernels.triton.quant import quantize_rows

from .test_gemm import assert_near_exact, quantized_matmul
from .test_linear import losses_by_backend
from .test_quant import assert_matches_reference

CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or INTERPRETED),
                                                  reason="needs CUDA (or TRITON_INTERPRET=1 for the small shapes)")]

# (M, K, N): q/o, gate/up and down projections of the 800M model at 4,096 tokens; small stand-ins when interpreted.
SHAPES = [(4096, 2048, 2048), (4096, 2048, 5632), (4096, 5632, 2048)] if CUDA else [(96, 256, 128), (33, 384, 64)]
SPECS = [TensorSpec(format="int4"), TensorSpec(format="int2"), TensorSpec(format="int1", grad="clip")]
SPEC_IDS = ["int4", "int2", "int1"]


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantizer_matches_the_reference_at_real_shapes(shape, dtype, spec):
    m, k, _ = shape
    assert_matches_reference(_randn(m, k, seed=k + m, dtype=dtype), spec)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp8_gemm_is_exact_at_real_shapes(shape, spec):
    m, k, n = shape
    xq = quantize_rows(_randn(m, k, seed=1, dtype=torch.bfloat16), spec)
    wq = quantize_rows(_randn(n, k, seed=2) * k**-0.5, spec)
    # |acc| ≤ K·15² < 2^53: the float64 product of the odd codes is the exact integer sum (int64 has no CUDA matmul).
    codes_x, codes_w = xq.unpacked_codes().double(), wq.unpacked_codes().double()
    want = (codes_x @ codes_w.t()).float() * (xq.step * 0.5)[:, None] * (wq.step * 0.5)[None, :]
    assert_near_exact(quantized_matmul(xq, wq), want.cpu(), xq, wq)
    bias = _randn(n, seed=3).bfloat16()
    got = quantized_matmul(xq, wq, bias, out_dtype=torch.bfloat16)
    torch.testing.assert_close(got.float(), want + bias.float(), rtol=2**-8, atol=2**-8 * float(want.abs().max()))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_backward_matches_a_float64_twin_at_real_shapes(shape, spec):
    m, k, n = shape
    xq = quantize_rows(_randn(m, k, seed=4), spec, codes=False, packed=True)
    wq = quantize_rows(_randn(n, k, seed=5) * k**-0.5, spec, codes=False, packed=True)
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        g = _randn(m, n, seed=6, dtype=dtype)
        want_x = block_hadamard(xq.unpacked_mask() * (g.double() @ wq.values().double()))
        want_w = block_hadamard(wq.unpacked_mask() * (g.double().t() @ xq.values().double()))
        for got, want in ((grad_input(g, xq, wq), want_x), (grad_weight(g, xq, wq), want_w)):
            # The GEMM in g's dtype (bf16: operands rounded to 8 bits, about 2^-9 each) against float64, relative
            # to the tensor's norm; fp32 (TF32 is off for torch.matmul): accumulation error only.
            assert float((got.double() - want).norm() / want.norm()) < rel, (dtype, spec.format)


@pytest.mark.parametrize("name", ["quest_w4a4", "quest_w4a4_g8g8", "quest_w1a1", "quest_w4"])
def test_layer_matches_the_reference_path_at_real_shapes(name):
    recipe = load_recipe(name)
    m, k, n = SHAPES[0]
    x, w, g = _randn(m, k, seed=7), _randn(n, k, seed=8) * k**-0.5, _randn(m, n, seed=9)
    out = {}
    for backend in ("reference", "triton"):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        # One seed for both paths: a stochastic backward draws the same bits on either (docs/numerics.md §8).
        y = quantized_linear(*leaves, recipe, backend=backend, grad_seed=torch.tensor(3))
        out[backend] = [y.detach(), *torch.autograd.grad(y, leaves, g)]
    # At this size some values sit within float rounding of a level boundary and flip (they are counted in the
    # quantizer tests); they move the outputs by far less than 1e-3 of their norm.
    for name_, got, want in zip(("y", "grad_x", "grad_w"), out["triton"], out["reference"], strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-3, name_


def test_few_training_steps_give_the_same_losses_with_either_backend_on_the_gpu_trainer(tmp_path):
    losses = losses_by_backend(tmp_path, ["trainer=gpu"] if CUDA else [], steps=6)
    # bf16 autocast on the GPU: the reference's matmul runs in bf16, the kernels' GEMM is exact then rounded once.
    for step, loss in losses["reference"].items():
        assert losses["triton"][step] == pytest.approx(loss, rel=1e-2), (step, losses)
