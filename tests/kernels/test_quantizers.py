"""Reference quantizers against docs/numerics.md §3–4 and independent float64 computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from bitlaw.kernels.formats import gaussian_scale, get_format
from bitlaw.kernels.quantizers import dequantize, fake_quantize, quantize, reference_linear
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe

C_B = {1: 0.7978845587, 2: 1.4935346, 3: 2.0510684, 4: 2.5139306}


def _blockdiag_h(k: int, block: int = 128) -> np.ndarray:
    h = scipy.linalg.hadamard(block) / math.sqrt(block)
    return scipy.linalg.block_diag(*([h] * (k // block)))


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_and_codes_match_an_independent_nearest_level_quantizer(bits):
    spec = TensorSpec(format=f"int{bits}")
    x = _randn(16, 1024, seed=bits) * 3.0
    res = quantize(x, spec)
    # Independent: rotate with scipy's Hadamard, α = c_b · RMS, levels ±α·(2q+1)/(2^b−1), nearest level.
    hb = _blockdiag_h(1024)
    x_h = x.numpy() @ hb
    alpha = gaussian_scale(f"int{bits}") * np.sqrt((x_h**2).mean(axis=1, keepdims=True))
    odd = np.arange(-(2**bits - 1), 2**bits, 2)
    levels = alpha[:, :, None] * odd / (2**bits - 1)
    nearest = np.abs(x_h[:, :, None] - levels).argmin(axis=-1)
    expected_codes = odd[nearest]
    codes = res.codes.numpy()
    # Only values within 1e-9 of a rounding boundary may differ; there should be none on fresh random inputs.
    assert (codes != expected_codes).sum() == 0
    assert set(np.unique(codes)) <= set(odd)
    assert codes.dtype == np.int16 and np.all(codes % 2 == 1)
    torch.testing.assert_close(res.values, res.codes.double() * res.step / 2, rtol=0, atol=0)
    np.testing.assert_allclose(res.values.numpy(), np.take_along_axis(levels, nearest[..., None], -1)[..., 0],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.step.numpy(), 2 * alpha / (2**bits - 1), rtol=1e-12)


@pytest.mark.parametrize("bits", range(1, 9))
def test_all_levels_used_on_gaussian_rows(bits):
    res = quantize(_randn(8, 2**17, seed=10 + bits), TensorSpec(format=f"int{bits}", rotation="none"))
    assert res.codes.unique().numel() == 2**bits


def test_one_bit_is_sign_times_sqrt_2_over_pi_rms():
    x = _randn(32, 512, seed=3)
    res = quantize(x, load_recipe("quest_w1a1").weight)
    x_h = torch.from_numpy(x.numpy() @ _blockdiag_h(512))
    expected = torch.sign(x_h) * math.sqrt(2 / math.pi) * x_h.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(res.values, expected, rtol=1e-12, atol=0)


# docs/numerics.md §4: expected masked fractions for x_h ~ N(0,1) (given to 3 significant digits there).
MASKED = [("int1", "trust", None, 0.111), ("int2", "trust", None, 0.0464), ("int3", "trust", None, 0.0191),
          ("int4", "trust", None, 0.00733), ("int8", "trust", None, 9.6e-5), ("int1", "clip", 1.30, 0.30)]


@pytest.mark.parametrize(("fmt", "grad", "clip", "expected"), MASKED)
def test_masked_fraction_matches_reference(fmt, grad, clip, expected):
    spec = TensorSpec(format=fmt, grad=grad, clip=clip)
    x = _randn(64, 2**16, seed=7, dtype=torch.float32)  # 4.2M samples; long rows keep the RMS estimate tight
    frac = 1 - quantize(x, spec).mask.double().mean().item()
    n = x.numel()
    sampling = 5 * math.sqrt(expected * (1 - expected) / n)
    digits = 0.5 * 10 ** (math.floor(math.log10(expected)) - (1 if expected != 0.30 else 0))
    assert abs(frac - expected) <= sampling + digits, (frac, expected)


def test_trust_mask_is_half_step_around_the_grid():
    spec = TensorSpec(format="int3")
    res = quantize(_randn(4, 1024, seed=5), spec)
    x_h = torch.from_numpy(_randn(4, 1024, seed=5).numpy() @ _blockdiag_h(1024))
    expected = (res.values - x_h).abs() <= res.step / 2 * (1 + 1e-12)
    assert torch.equal(res.mask, expected)


def test_ste_and_absmax_rules():
    x = _randn(8, 256, seed=8)
    ste = quantize(x, TensorSpec(format="int4", grad="ste", rotation="none"))
    assert torch.equal(ste.mask, x.abs() <= ste.scale)
    absmax = quantize(x, TensorSpec(format="int4", scale="absmax", rotation="none"))
    torch.testing.assert_close(absmax.scale, x.abs().amax(-1, keepdim=True))
    assert absmax.mask.all() and absmax.codes.abs().max() == 15


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_input_gradient_is_iht_of_masked_ht(bits):
    """g_x = IHT(M ⊙ HT(g)) for x ↦ IHT(Q(HT(x))), computed independently in float64."""
    spec = TensorSpec(format=f"int{bits}")
    x = _randn(6, 256, seed=bits).requires_grad_(True)
    g = _randn(6, 256, seed=100 + bits)
    hb = torch.from_numpy(_blockdiag_h(256))
    out = fake_quantize(x, spec) @ hb.T  # IHT of the rotated-domain output
    out.backward(g)
    x_h = x.detach() @ hb
    alpha = gaussian_scale(f"int{bits}") * x_h.square().mean(-1, keepdim=True).sqrt()
    mask = x_h.abs() <= alpha * 2**bits / (2**bits - 1)
    expected = ((g @ hb) * mask) @ hb.T
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_quantized_linear_gradients_follow_reference_section_2():
    recipe = load_recipe("quest_w4a4")
    x = _randn(5, 7, 256, seed=20).requires_grad_(True)
    w = _randn(48, 256, seed=21).requires_grad_(True)
    g_y = _randn(5, 7, 48, seed=22)
    y = reference_linear(x, w, recipe)
    y.backward(g_y)
    hb = torch.from_numpy(_blockdiag_h(256))
    qx, qw = quantize(x.detach(), recipe.input), quantize(w.detach(), recipe.weight)
    torch.testing.assert_close(y.detach(), qx.values @ qw.values.T, rtol=0, atol=0)
    g_x = ((g_y @ qw.values) * qx.mask) @ hb.T
    g_w = ((g_y.reshape(-1, 48).T @ qx.values.reshape(-1, 256)) * qw.mask) @ hb.T
    torch.testing.assert_close(x.grad, g_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, g_w, rtol=1e-12, atol=1e-12)


def test_quantized_product_approximates_the_exact_one():
    x, w = _randn(64, 512, seed=30), _randn(32, 512, seed=31)
    exact = x @ w.T
    err = {b: (reference_linear(x, w, load_recipe(f"quest_w{b}a{b}")) - exact).norm() / exact.norm()
           for b in (2, 4, 8)}
    assert err[8] < 0.02 < err[4] < err[2] < 0.6


def test_weight_only_uses_rotated_back_weight_and_is_smooth_in_x():
    recipe = load_recipe("quest_w4")
    w = _randn(16, 128, seed=40)
    x = _randn(3, 128, seed=41).requires_grad_(True)
    w_eff = quantize(w, recipe.weight).values @ torch.from_numpy(_blockdiag_h(128)).T
    torch.testing.assert_close(reference_linear(x, w, recipe), x @ w_eff.T, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: reference_linear(t, w, recipe), (x,))


def test_bf16_recipe_is_a_plain_linear_gradcheck():
    x = _randn(3, 32, seed=42).requires_grad_(True)
    w = _randn(8, 32, seed=43).requires_grad_(True)
    torch.testing.assert_close(reference_linear(x, w, Recipe()), x @ w.T, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a, b: reference_linear(a, b, Recipe()), (x, w))


@pytest.mark.parametrize("fmt", ["ternary", "fp4_e2m1", "fp8_e4m3"])
def test_non_uniform_grids_round_to_the_nearest_level(fmt):
    spec = TensorSpec(format=fmt, rotation="none")
    x = _randn(4, 4096, seed=50)
    res = quantize(x, spec)
    levels = torch.tensor(spec.fmt.levels, dtype=torch.float64)
    scaled = levels[None, None, :] * res.scale[..., None]
    nearest = (x[..., None] - scaled).abs().argmin(-1)
    assert torch.equal(res.codes.long(), nearest)
    torch.testing.assert_close(res.values, levels[nearest] * res.scale, rtol=0, atol=0)
    torch.testing.assert_close(res.scale, gaussian_scale(fmt) * x.square().mean(-1, keepdim=True).sqrt())


def test_fp4_grid_values():
    res = quantize(_randn(2, 8192, seed=51), TensorSpec(format="fp4_e2m1", rotation="none"))
    unit = torch.tensor(get_format("fp4_e2m1").levels, dtype=torch.float64)[res.codes.unique().long()]
    torch.testing.assert_close(res.values, unit.new_tensor(get_format("fp4_e2m1").levels)[res.codes.long()] * res.scale)
    expected = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    torch.testing.assert_close(unit, torch.cat([-expected.flip(0)[:-1], expected]))


def test_lsq_scale_gradient_matches_formula():
    spec = TensorSpec(format="int4", scale="lsq", grad="ste", rotation="none")
    x = _randn(4, 64, seed=60).requires_grad_(True)
    s = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    g = _randn(4, 64, seed=61)
    fake_quantize(x, spec, s).backward(g)
    # LSQ (Esser et al.): d x̂/d s = (level − x/s) inside the grid, ±max level outside; grad scale 1/sqrt(n·q_max).
    xd, sd = x.detach(), 1.7
    step = 2 * sd / 15
    q = torch.clamp(torch.floor(xd / step), -8, 7)
    level = (q + 0.5) * step / sd
    inside = xd.abs() <= sd
    d = torch.where(inside, level - xd / sd, level)
    expected = (g * d).sum() / math.sqrt(xd.numel() * 7.5)
    torch.testing.assert_close(s.grad, expected.reshape(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, g * inside, rtol=0, atol=0)


def test_lsq_requires_its_scale():
    with pytest.raises(ValueError, match="lsq_scale"):
        quantize(_randn(2, 16), TensorSpec(format="int4", scale="lsq", rotation="none"))


def test_zero_rows_stay_finite():
    x = torch.zeros(2, 128)
    res = quantize(x, TensorSpec(format="int4"))
    assert torch.isfinite(res.values).all() and res.mask.all()


def test_bf16_and_fp32_inputs_compute_in_fp32():
    x = _randn(4, 128, seed=70, dtype=torch.float32)
    w = _randn(8, 128, seed=71, dtype=torch.float32)
    recipe = load_recipe("quest_w4a4")
    y32 = reference_linear(x, w, recipe)
    assert y32.dtype == torch.float32
    y16 = reference_linear(x.bfloat16(), w, recipe)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


@pytest.mark.parametrize("fmt", ["int1", "int3", "int4", "int8", "ternary", "fp4_e2m1", "fp8_e4m3"])
def test_dequantize_reproduces_values_bitwise(fmt):
    spec = TensorSpec(format=fmt)
    res = quantize(_randn(16, 256, seed=80, dtype=torch.float32), spec)
    step_or_scale = res.step if res.step is not None else res.scale
    assert torch.equal(dequantize(res.codes, step_or_scale, spec.fmt), res.values)
