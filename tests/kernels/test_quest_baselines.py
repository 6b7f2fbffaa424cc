"""The baselines as QuEST's code runs them (docs/numerics.md §5): the unmasked STE, the clip-at-α rule that `ste`
used to be, QuEST's LSQ (learned step, its init and gradient scale) and the weight-only layout that keeps the
quantized weight rotated."""

import dataclasses
import math

import pytest
import scipy.linalg
import torch

from bitlaw.kernels.formats import get_format
from bitlaw.kernels.quantizers import fake_quantize, initial_lsq_scale, quantize, reference_linear, rotate
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _blockdiag_h(k: int) -> torch.Tensor:
    """The orthonormal block-diagonal Sylvester Hadamard ``[k, k]`` (blocks of 128), float64, built independently."""
    h = torch.from_numpy(scipy.linalg.hadamard(128) / math.sqrt(128))
    return torch.block_diag(*[h] * (k // 128))


@pytest.mark.parametrize("spec", [load_recipe("ste_w4a4").weight, TensorSpec(format="int4z", grad="ste",
                                                                              rotation="none"),
                                  TensorSpec(format="fp4_e2m1", grad="ste", rotation="none")],
                         ids=["ste_w4a4", "int4z", "fp4"])
def test_ste_passes_the_gradient_unchanged_everywhere(spec):
    x = (_randn(6, 256, seed=1) * 1.5).requires_grad_(True)
    g = _randn(6, 256, seed=2)
    res = quantize(x.detach(), spec)
    assert res.mask.all() and (x.detach().abs() > res.scale * spec.fmt.max_level).any()  # clipped ones included
    fake_quantize(x, spec).backward(g)
    assert torch.equal(x.grad, g)


def test_rotated_ste_is_the_identity_up_to_the_rotation():
    # x̂_h lives in the rotated domain: with nothing masked, d(g·x̂_h)/dx is g rotated back, g·Hᵀ.
    x = _randn(4, 256, seed=3).requires_grad_(True)
    g = _randn(4, 256, seed=4)
    fake_quantize(x, TensorSpec(format="int4", grad="ste")).backward(g)
    torch.testing.assert_close(x.grad, g @ _blockdiag_h(256).T, rtol=0, atol=1e-13)


def _old_ste_mask(x_h: torch.Tensor, scale: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """``grad: ste`` as bitlaw computed it before it became the unmasked STE: gradient wherever nothing is clipped,
    ``[lowest level, α]`` (``±α`` on the symmetric grids)."""
    fmt = get_format(fmt_name)
    high = 1.0 * fmt.max_level
    low = -high if fmt.levels[0] == -fmt.max_level else fmt.levels[0]
    return (x_h >= low * scale) & (x_h <= high * scale)


@pytest.mark.parametrize("fmt", ["int4", "int2", "int4z", "fp4_e2m1", "ternary"])
def test_clip1_masks_equal_the_old_ste_masks_bitwise(fmt):
    spec = dataclasses.replace(load_recipe("clip1_w4a4").weight, format=fmt)
    x = _randn(64, 512, seed=5, dtype=torch.float32) * 0.7 + 0.05
    res = quantize(x, spec)
    want = _old_ste_mask(rotate(x, spec), res.scale, fmt)
    assert torch.equal(res.mask, want)
    assert 0.5 < want.float().mean() < 1  # elements on both sides of the rule


def test_clip1_preset_is_quest_w4a4_with_the_clip_mask():
    clip1, quest = load_recipe("clip1_w4a4"), load_recipe("quest_w4a4")
    assert clip1.weight == clip1.input == dataclasses.replace(quest.weight, grad="clip", clip=1.0)


def _quest_lsq(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """QuEST's ``LSQQuantizer.forward`` (raise_zero, signed) written with torch autograd, without its ``+ step·1e-9``
    output term (docs/numerics.md §5): the gradient-scale trick, clamp, straight-through round."""
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = 1.0 / math.sqrt(x.numel() * q_max)
    step = (step - step * scale).detach() + step * scale
    clamped = torch.clamp(x / step - 0.5, q_min, q_max)
    return ((clamped.round() - clamped).detach() + clamped + 0.5) * step


@pytest.mark.parametrize("bits", [2, 4])
def test_quest_lsq_matches_quests_formula_under_autograd(bits):
    spec = dataclasses.replace(load_recipe("lsq_w4a4").weight, format=f"int{bits}")
    x = (_randn(4, 96, seed=10 + bits) * 1.3).requires_grad_(True)
    g = _randn(4, 96, seed=20 + bits)
    step = torch.tensor([0.45], dtype=torch.float64, requires_grad=True)
    values = fake_quantize(x, spec, step)
    values.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    step_ref = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
    want = _quest_lsq(x_ref, step_ref, bits)
    want.backward(g)
    assert (x.detach().abs() > 0.45 * (2**bits - 1) / 2).any()  # some elements are clipped
    torch.testing.assert_close(values, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-14)
    assert step.grad.item() == pytest.approx(step_ref.grad.item(), rel=1e-12)


def test_quest_lsq_step_gradient_by_hand():
    spec = load_recipe("lsq_w4a4").input
    x = _randn(3, 40, seed=30) * 2
    g = _randn(3, 40, seed=31)
    step = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    fake_quantize(x, spec, step).backward(g)
    # LSQ in units of the step: d x̂/d s = level − x/s where |x| ≤ 7.5·s, the clip level ±7.5 outside; Q_P = 7.
    v = x / 0.3
    inside = v.abs() <= 7.5
    level = torch.clamp(torch.floor(v), -8, 7) + 0.5
    d = torch.where(inside, level - v, level)
    assert (~inside).any()
    assert step.grad.item() == pytest.approx(((g * d).sum() / math.sqrt(x.numel() * 7)).item(), rel=1e-12)


def test_quest_lsq_init_is_lsqs_and_there_is_no_rotation():
    spec = load_recipe("lsq_w4a4").weight
    assert not spec.rotated and spec.scale == "lsq_step"
    x = _randn(16, 256, seed=40)
    assert initial_lsq_scale(x, spec).item() == pytest.approx((2 * x.abs().mean() / math.sqrt(7)).item(), rel=1e-14)
    # No rotation: the values are the plain centred grid of the learned step on x itself.
    step = 0.4
    q = torch.clamp(torch.floor(x / step), -8, 7)
    torch.testing.assert_close(quantize(x, spec, torch.tensor([step], dtype=torch.float64)).values,
                               (q + 0.5) * step, rtol=1e-13, atol=0)


@pytest.mark.parametrize("fmt", ["int1", "int4z", "fp4_e2m1", "ternary"])
def test_lsq_step_rejects_grids_without_a_centred_integer_step(fmt):
    with pytest.raises(ValueError, match=rf"scale='lsq_step' is not allowed with format='{fmt}'; allowed: int2 … "
                                         "int8"):
        TensorSpec(format=fmt, scale="lsq_step")


@pytest.mark.parametrize("bits", [1, 4])
def test_rotated_layout_forward_and_gradient_by_hand(bits):
    recipe = load_recipe(f"quest_w{bits}_rotated")
    assert recipe.layout == "rotated" and not recipe.input.quantized
    w = (_randn(24, 256, seed=50 + bits) * 0.05).requires_grad_(True)
    x = _randn(5, 256, seed=60 + bits).requires_grad_(True)
    g = _randn(5, 24, seed=70 + bits)
    y = reference_linear(x, w, recipe)
    y.backward(g)
    # By hand: w_h = W·H, α = c·RMS per row, the centred grid, used as it is: y = x · Q(W·H)ᵀ.
    h = _blockdiag_h(256)
    w_h = w.detach() @ h
    alpha = recipe.weight.gaussian_scale * w_h.square().mean(-1, keepdim=True).sqrt()
    step = 2 * alpha / (2**bits - 1)
    w_hat = (torch.clamp(torch.floor(w_h / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 0.5) * step
    torch.testing.assert_close(y, x.detach() @ w_hat.T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, reference_linear(x.detach(), w.detach(), load_recipe(f"quest_w{bits}")))
    torch.testing.assert_close(x.grad, g @ w_hat, rtol=1e-12, atol=1e-12)
    keep = w_h.abs() <= alpha * recipe.weight.mask_threshold
    torch.testing.assert_close(w.grad, (keep * (g.T @ x.detach())) @ h.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("changes", "message"), [
    ({"input": TensorSpec(format="int4")},
     r"layout='rotated' is only allowed for weight-only recipes \(input format bf16\); got input format='int4'"),
    ({"weight": TensorSpec(format="int4", rotation="none")},
     r"layout='rotated' needs a rotated weight .*got weight format='int4', rotation='none'"),
    ({"weight": TensorSpec()}, r"layout='rotated' needs a rotated weight .*got weight format='bf16'"),
])
def test_rotated_layout_outside_weight_only_rotated_recipes_is_refused(changes, message):
    base = load_recipe("quest_w4_rotated")
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(base, **changes)
    data = dataclasses.replace(base, layout="rotate_back", **changes).to_dict() | {"layout": "rotated"}
    with pytest.raises(ValueError, match=r"recipe 'quest_w4_rotated': " + message):
        Recipe.from_dict(data)
    with pytest.raises(ValueError, match="layout='sideways' is not allowed; allowed: rotate_back, rotated"):
        dataclasses.replace(base, layout="sideways")


def test_layout_is_recorded_only_when_not_the_default():
    assert "layout" not in load_recipe("quest_w4").to_dict()
    rotated = load_recipe("quest_w4_rotated")
    assert rotated.to_dict()["layout"] == "rotated" and Recipe.from_dict(rotated.to_dict()) == rotated
    assert dataclasses.replace(rotated, name="quest_w4", layout="rotate_back") == load_recipe("quest_w4")
