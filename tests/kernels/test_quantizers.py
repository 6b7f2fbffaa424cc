"""Reference quantizers against docs/numerics.md §3–4 and independent float64 computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import norm

from bitlaw.kernels.formats import gaussian_scale, get_format
from bitlaw.kernels.quantizers import (
    dequantize,
    fake_quantize,
    mask_bounds,
    quantize,
    reference_linear,
    round_to_grid,
)
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


ZERO_LEVEL_GRIDS = [f"int{b}{suffix}" for b in range(2, 9) for suffix in "zs"]


@pytest.mark.parametrize("name", ZERO_LEVEL_GRIDS)
def test_zero_level_grids_are_integers_times_one_step(name):
    fmt = get_format(name)
    qmin, qmax = fmt.integer_range
    x = _randn(16, 1024, seed=fmt.bits) * 3.0
    res = quantize(x, TensorSpec(format=name))
    # Independent: scipy's Hadamard, α = c · RMS, levels α·q/qmax, nearest level (numpy, float64).
    x_h = x.numpy() @ _blockdiag_h(1024)
    alpha = gaussian_scale(name) * np.sqrt((x_h**2).mean(axis=1, keepdims=True))
    q = np.arange(qmin, qmax + 1)
    nearest = np.abs(x_h[:, :, None] - alpha[:, :, None] * q / qmax).argmin(axis=-1)
    codes = res.codes.numpy()
    assert codes.dtype == np.int16 and codes.min() >= 0 and codes.max() <= qmax - qmin
    assert (codes != nearest).sum() == 0  # the code is the level index q - qmin
    np.testing.assert_allclose(res.step.numpy(), alpha / qmax, rtol=1e-12)
    # values are exactly q · step, and dequantize rebuilds them bitwise, in float64 and fp32.
    torch.testing.assert_close(res.values, (res.codes.double() + qmin) * res.step, rtol=0, atol=0)
    assert torch.equal(dequantize(res.codes, res.step, fmt), res.values)
    res32 = quantize(x.float(), TensorSpec(format=name))
    assert res32.values.dtype == torch.float32 and torch.equal(dequantize(res32.codes, res32.step, fmt), res32.values)


@pytest.mark.parametrize("name", ["int2z", "int4z", "int4s", "int8z"])
def test_zero_level_grids_use_every_level_on_gaussian_rows(name):
    res = quantize(_randn(8, 2**17, seed=len(name)), TensorSpec(format=name, rotation="none"))
    qmin, qmax = get_format(name).integer_range
    assert res.codes.unique().tolist() == list(range(qmax - qmin + 1))  # the lowest level (-8 for int4z) included


def test_zero_level_rounding_ties_to_even_and_clamps():
    fmt = get_format("int4z")
    step = torch.tensor([[0.25]], dtype=torch.float64)  # a power of two: every product below is exact
    x_h = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 0.0, 6.9, 7.6, 100.0, -7.9, -8.4, -100.0]],
                       dtype=torch.float64) * step
    values, codes, got_step = round_to_grid(x_h, step * 7, fmt)
    q = [0, 2, 2, 0, -2, 0, 7, 7, 7, -8, -8, -8]
    assert codes.tolist() == [[v + 8 for v in q]] and torch.equal(got_step, step)
    assert torch.equal(values, torch.tensor([q], dtype=torch.float64) * step)


def test_zero_level_mask_bounds():
    # int4z: trust keeps |x̂ - x| <= step/2 on both ends, -8 level included: [-17/14 α, 15/14 α].
    low, high = mask_bounds(TensorSpec(format="int4z"))
    assert low == pytest.approx(-17 / 14, rel=1e-15) and high == pytest.approx(15 / 14, rel=1e-15)
    assert mask_bounds(TensorSpec(format="int4z", grad="clip", clip=1.0)) == (-8 / 7, 1.0)  # the grid's own range
    assert mask_bounds(TensorSpec(format="int4z", grad="ste")) == (-math.inf, math.inf)
    assert mask_bounds(TensorSpec(format="int4s")) == (-high, high)
    assert mask_bounds(TensorSpec(format="int4")) == (-16 / 15, 16 / 15)
    assert mask_bounds(TensorSpec(format="int1", grad="clip")) == (-1.30, 1.30)


def test_one_bit_is_sign_times_sqrt_2_over_pi_rms():
    x = _randn(32, 512, seed=3)
    res = quantize(x, load_recipe("quest_w1a1").weight)
    x_h = torch.from_numpy(x.numpy() @ _blockdiag_h(512))
    expected = torch.sign(x_h) * math.sqrt(2 / math.pi) * x_h.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(res.values, expected, rtol=1e-12, atol=0)


# docs/numerics.md §4's table of masked fractions of x_h ~ N(0,1), with the significant digits it gives. The test
# checks that each figure is the exact fraction (the Gaussian mass outside the mask bounds at the Gaussian-optimal
# scale) rounded, and that the quantizer drops that fraction of a large sample.
MASKED = [("int1", "trust", None, "0.1105"), ("int2", "trust", None, "0.04644"), ("int3", "trust", None, "0.01907"),
          ("int4", "trust", None, "0.007327"), ("int8", "trust", None, "8.23e-5"), ("int1", "clip", 1.30, "0.2996"),
          ("int4z", "trust", None, "0.007550"), ("int4s", "trust", None, "0.008035")]


def exact_masked_fraction(spec: TensorSpec) -> float:
    """P(x outside the mask) for x ~ N(0, 1) quantized by ``spec`` with the exact RMS (= 1)."""
    low, high = mask_bounds(spec)
    return float(norm.cdf(low * spec.gaussian_scale) + norm.sf(high * spec.gaussian_scale))


@pytest.mark.parametrize(("fmt", "grad", "clip", "documented"), MASKED)
def test_masked_fraction_matches_the_exact_gaussian_fraction(fmt, grad, clip, documented):
    spec = TensorSpec(format=fmt, grad=grad, clip=clip)
    exact = exact_masked_fraction(spec)
    digits = len(documented.split("e")[0].replace("0.", "", 1).lstrip("0").replace(".", ""))
    assert f"{exact:.{digits}g}" == f"{float(documented):.{digits}g}", (exact, documented)
    x = _randn(64, 2**16, seed=7, dtype=torch.float32)  # 4.2M samples; long rows keep the RMS estimate tight
    frac = 1 - quantize(x, spec).mask.double().mean().item()
    # Sampling error of the fraction, plus the per-row RMS estimate moving the bounds (rows of n = 65,536 give RMS
    # within 1 ± 4/sqrt(2n) at 4 sigma; the density at each bound times how far that moves it).
    low, high = mask_bounds(spec)
    bounds = [b * spec.gaussian_scale for b in (low, high) if math.isfinite(b)]
    rms_shift = 4 / math.sqrt(2 * 2**16) * sum(abs(b) * norm.pdf(b) for b in bounds)
    sampling = 5 * math.sqrt(exact * (1 - exact) / x.numel())
    assert abs(frac - exact) <= sampling + rms_shift, (frac, exact, sampling, rms_shift)


@pytest.mark.parametrize("name", ["int3", "int3z", "int4z", "int4s"])
def test_trust_mask_is_half_step_around_the_grid(name):
    spec = TensorSpec(format=name)
    res = quantize(_randn(4, 1024, seed=5), spec)
    x_h = torch.from_numpy(_randn(4, 1024, seed=5).numpy() @ _blockdiag_h(1024))
    expected = (res.values - x_h).abs() <= res.step / 2 * (1 + 1e-12)
    assert torch.equal(res.mask, expected)
    assert not res.mask.all()  # some rows clip: the rule is tested on both sides of the grid, not just inside it


def test_ste_and_absmax_rules():
    x = _randn(8, 256, seed=8)
    ste = quantize(x, TensorSpec(format="int4", grad="ste", rotation="none"))
    assert ste.mask.all() and (x.abs() > ste.scale).any()  # clipped elements keep their gradient too
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


@pytest.mark.parametrize("name", ["quest_w4a4", "quest_w4za4z"])
def test_quantized_linear_gradients_follow_reference_section_2(name):
    recipe = load_recipe(name)
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


def test_training_steps_on_int4z_are_finite_and_keep_the_lowest_level_trainable():
    recipe = load_recipe("quest_w4za4z")
    x = _randn(64, 256, seed=50, dtype=torch.float32)
    w = (_randn(32, 256, seed=51, dtype=torch.float32) * 0.05).requires_grad_(True)
    target = x @ _randn(32, 256, seed=52, dtype=torch.float32).T * 0.05
    optimizer = torch.optim.SGD([w], lr=0.5)
    losses = []
    for _ in range(4):
        stats: dict = {}
        loss = (reference_linear(x, w, recipe, stats=stats) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
        qw, qx = quantize(w.detach(), recipe.weight), quantize(x, recipe.input)
        assert float(stats["weight_masked_fraction"]) == pytest.approx(1 - qw.mask.double().mean().item(), abs=1e-7)
        assert float(stats["input_masked_fraction"]) == pytest.approx(1 - qx.mask.double().mean().item(), abs=1e-7)
        assert 0.002 < float(stats["input_masked_fraction"]) < 0.02  # docs/numerics.md §6.1: 0.755 % on N(0, 1)
        # The -8 level is part of the grid: what rounds to it within half a step keeps its gradient.
        lowest = qx.codes == 0
        assert qx.mask[lowest].any() and not qx.mask[lowest].all()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lsq_on_int4z_follows_the_grid_range_and_q_p():
    spec = TensorSpec(format="int4z", scale="lsq", grad="clip", clip=1.0, rotation="none")
    x = _randn(4, 64, seed=60).requires_grad_(True)
    scale = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    g = _randn(4, 64, seed=61)
    fake_quantize(x, spec, scale).backward(g)
    # LSQ (Esser et al.) with Q_N = 8, Q_P = 7 and step = scale / 7, written in units of the step.
    v = x.detach() / (2.0 / 7)
    q = v.round().clamp(-8, 7)
    inside = (v >= -8) & (v <= 7)
    dvalue_dscale = torch.where(inside, (q - v) / 7, q / 7)
    assert (~inside).any() and (v < -7.5).any()
    assert scale.grad.item() == pytest.approx(((g * dvalue_dscale).sum() / math.sqrt(x.numel() * 7)).item(), rel=1e-12)
    assert torch.equal(x.grad, g * inside)


def test_quantized_product_approximates_the_exact_one():
    x, w = _randn(64, 512, seed=30), _randn(32, 512, seed=31)
    exact = x @ w.T
    err = {b: (reference_linear(x, w, load_recipe(f"quest_w{b}a{b}")) - exact).norm() / exact.norm()
           for b in (2, 4, 8)}
    assert err[8] < 0.02 < err[4] < err[2] < 0.6


@pytest.mark.parametrize("name", ["quest_w4", "quest_w4z"])
def test_weight_only_uses_rotated_back_weight_and_is_smooth_in_x(name):
    recipe = load_recipe(name)
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
    spec = TensorSpec(format="int4", scale="lsq", grad="clip", clip=1.0, rotation="none")
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
