"""Sparsity, group scales and outliers in the reference quantizer (docs/numerics.md §7): exact counts with ties,
N:M, the backward rules against direct implementations written here, RigL's update, the cubic schedule, group
scales, outliers, storage bits, and the recipe's validation."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from bitlaw.kernels import sparsity
from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.linear import select_backend, triton_unsupported_reason
from bitlaw.kernels.quantizers import fake_quantize, quantize, round_to_grid
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe

NEW_PRESETS = ["sparse50_magnitude", "sparse70_magnitude", "sparse90_magnitude", "sparse50_rbbm", "sparse70_rbbm",
               "sparse90_rbbm", "sparse_2of4", "sparse50_w4a4", "quest_w4a4_g32", "quest_w4a4_outliers1", "rigl50"]


def _tied(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Small integers: many equal magnitudes (and zeros), so the tie rule decides."""
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


def _gaussian(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _top(values: list[float], k: int) -> set[int]:
    """Indices of the k largest |values|, equal magnitudes to the lower index: the documented rule, written out."""
    return set(sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))[:k])


def _keep_of(rows: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    for r, row in enumerate(rows.tolist()):
        keep[r, sorted(_top(row, k))] = True
    return keep


def test_counts_round_half_up_and_keep_one():
    assert sparsity.kept_count(6, 0.25) == 4  # 1.5 pruned rounds up to 2
    assert sparsity.kept_count(10, 0.7) == 3  # 0.7 · 10 is 7.000000000000001 in binary: still 7
    assert sparsity.kept_count(100, 0.29) == 71  # 28.999999999999996: rounding, not flooring
    assert sparsity.kept_count(4, 0.9) == 1  # 3.6 → 4 would prune everything: one survives
    assert sparsity.kept_count(128, torch.tensor(0.5)).item() == 64


@pytest.mark.parametrize("structure", ["row", "tensor"])
def test_realised_sparsity_is_exact_with_ties(structure):
    x = _tied((6, 40))
    res = quantize(x, TensorSpec(format="bf16", sparsity=0.3, structure=structure))
    if structure == "row":
        expected = _keep_of(x, 40 - 12)
        assert (res.keep.sum(dim=-1) == 28).all()
    else:
        expected = _keep_of(x.reshape(1, -1), 240 - 72).reshape(x.shape)
        assert res.keep.sum() == 168
    assert torch.equal(res.keep, expected)
    assert torch.equal(res.values, torch.where(expected, x, 0.0))


@pytest.mark.parametrize(("structure", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_keeps_exactly_n_of_every_m(structure, n, m):
    x = _tied((5, 64), seed=1)
    res = quantize(x, TensorSpec(format="bf16", structure=structure))
    groups = x.reshape(-1, m)
    assert (res.keep.reshape(-1, m).sum(dim=-1) == n).all()
    assert torch.equal(res.keep.reshape(-1, m), _keep_of(groups, n))
    assert TensorSpec(structure=structure).realised_sparsity == 1 - n / m


def test_magnitude_backward_is_the_forward_mask_times_the_quantizer_mask():
    x = _gaussian((8, 96)).requires_grad_()
    g = _gaussian((8, 96), seed=1)
    fake_quantize(x, TensorSpec(format="bf16", sparsity=0.5)).backward(g)
    keep = _keep_of(x.detach(), 48)
    assert torch.equal(x.grad, g * keep)

    x.grad = None
    spec = TensorSpec(format="int4", rotation="none", sparsity=0.5)
    fake_quantize(x, spec).backward(g)
    xd = x.detach()
    alpha = spec.gaussian_scale * (xd.square() * keep).sum(-1, keepdim=True).div(48).sqrt()
    trust = xd.abs() <= alpha * 16 / 15
    assert torch.equal(x.grad, g * (keep & trust))


def _rbbm_direct(x: torch.Tensor, kept: int, p: float) -> torch.Tensor:
    """RBBM on each row of x written from the rule of docs/numerics.md §7 with Python sorting."""
    flows = torch.zeros(x.shape, dtype=torch.bool)
    for r, row in enumerate(x.tolist()):
        keep = _top(row, kept)
        t_k = min(abs(row[i]) for i in keep)
        t_p = math.sqrt(sum(v * v for v in row) / len(row)) * NormalDist().inv_cdf(0.5 + p)
        low, high = min(t_p, t_k), max(t_p, t_k)
        for i, v in enumerate(row):
            flows[r, i] = abs(v) < low or (i in keep and abs(v) >= high)
    return flows


@pytest.mark.parametrize(("s", "p"), [(0.5, 0.1), (0.1, 0.4), (0.9, 0.25)])  # T_p < T_k, T_p > T_k, T_p < T_k
def test_rbbm_mask_matches_the_rule_elementwise(s, p):
    x = _gaussian((6, 64), seed=2).double()
    res = quantize(x, TensorSpec(format="bf16", sparsity=s, sparse_rule="rbbm", band=p))
    kept = sparsity.kept_count(64, s)
    assert torch.equal(res.keep, _keep_of(x, kept))
    assert torch.equal(res.mask, _rbbm_direct(x, kept, p))
    assert (res.mask & ~res.keep).any() or p == 0  # some pruned weights learn


@pytest.mark.parametrize("structure", ["row", "tensor"])
def test_rbbm_with_p_zero_is_magnitude_bitwise(structure):
    x = _tied((8, 128), seed=3) + 0.01 * _gaussian((8, 128))
    rbbm = quantize(x, TensorSpec(format="int4", sparsity=0.7, structure=structure, sparse_rule="rbbm"))
    magnitude = quantize(x, TensorSpec(format="int4", sparsity=0.7, structure=structure))
    assert torch.equal(rbbm.mask, magnitude.mask) and torch.equal(rbbm.values, magnitude.values)
    x_h = block_hadamard(x, 128)
    assert torch.equal(sparsity.band_mask(x_h, magnitude.keep, structure, 0.0), magnitude.keep)
    assert not torch.equal(sparsity.band_mask(x_h, magnitude.keep, structure, 0.1), magnitude.keep)


def test_rigl_update_drops_smallest_and_grows_largest_gradient():
    w, g = _gaussian((6, 40), seed=4), _gaussian((6, 40), seed=5)
    mask = sparsity.magnitude_keep(w, "row", 0.5)
    new = sparsity.rigl_update(mask, w, g, 0.3, "row")
    drop = math.floor(0.3 * 20 + 0.5)
    for r in range(6):
        active = [i for i in range(40) if mask[r, i]]
        survivors = set(sorted(active, key=lambda i: (-abs(w[r, i].item()), i))[:20 - drop])
        candidates = [i for i in range(40) if i not in survivors]
        grown = set(sorted(candidates, key=lambda i: (-abs(g[r, i].item()), i))[:drop])
        assert set(torch.nonzero(new[r]).flatten().tolist()) == survivors | grown
    assert torch.equal(new.sum(-1), mask.sum(-1))
    tensor_mask = sparsity.magnitude_keep(w, "tensor", 0.5)
    assert sparsity.rigl_update(tensor_mask, w, g, 0.3, "tensor").sum() == 120


def test_rigl_schedule_of_updates_and_drop_fraction():
    spec = TensorSpec(format="bf16", sparsity=0.5, sparse_rule="rigl", update_every=10, drop_fraction=0.4)
    assert [t for t in range(100) if sparsity.rigl_due(spec, t, 100)] == [0, 10, 20, 30, 40, 50, 60, 70]
    assert sparsity.rigl_drop_fraction(spec, 0, 100) == pytest.approx(0.4)
    assert sparsity.rigl_drop_fraction(spec, 37.5, 100) == pytest.approx(0.2)
    assert sparsity.rigl_drop_fraction(spec, 75, 100) == pytest.approx(0.0)


def test_cubic_schedule_values():
    spec = TensorSpec(format="bf16", sparsity=0.8, schedule="cubic", ramp=0.5)
    for step, expected in [(0, 0.0), (10, 0.8 * (1 - 0.8**3)), (25, 0.7), (49, 0.8 * (1 - 0.02**3)), (50, 0.8),
                           (99, 0.8), (-1, 0.8)]:
        value = sparsity.scheduled_sparsity(spec, torch.tensor([step, 100]))
        assert value.item() == pytest.approx(expected, abs=1e-15), step
    assert sparsity.scheduled_sparsity(TensorSpec(format="bf16", sparsity=0.8), torch.tensor([3, 100])) is None
    x = _gaussian((4, 50))
    res = quantize(x, spec, sparse=sparsity.SparseState(sparsity=torch.tensor(0.7, dtype=torch.float64)))
    assert (res.keep.sum(-1) == 50 - 35).all()


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_group_scale_follows_the_formula_per_group(rotation):
    spec = TensorSpec(format="int4", rotation=rotation, group=32)
    x = _gaussian((3, 128), seed=6)
    res = quantize(x, spec)
    x_h = block_hadamard(x, 128) if rotation == "hadamard" else x
    groups = x_h.reshape(3, 4, 32)
    scale = spec.gaussian_scale * groups.square().mean(dim=-1, keepdim=True).sqrt()
    assert res.scale.shape == (3, 4, 1)
    torch.testing.assert_close(res.scale, scale, rtol=1e-6, atol=0)
    values, _, _ = round_to_grid(groups, res.scale, spec.fmt)
    assert torch.equal(res.values, values.reshape(3, 128))


def test_outliers_are_the_largest_kept_in_bf16_and_scale_skips_them():
    spec = TensorSpec(format="int4", rotation="none", outliers=0.05)
    x = _gaussian((4, 100), seed=7)
    x[:, ::17] *= 30
    res = quantize(x, spec)
    expected = _keep_of(x, 5)
    assert torch.equal(res.outlier, expected)
    assert torch.equal(res.values[expected], x[expected].bfloat16().float())
    inliers = ~expected
    alpha = spec.gaussian_scale * (x.square() * inliers).sum(-1, keepdim=True).div(95).sqrt()
    torch.testing.assert_close(res.scale, alpha, rtol=1e-6, atol=0)
    on_grid, _, _ = round_to_grid(x, res.scale, spec.fmt)
    assert torch.equal(res.values[inliers], on_grid[inliers])
    assert res.mask[expected].all()  # not clipped: their gradient passes


def test_sparse_quantized_survivors_sit_on_the_grid_and_the_rest_is_zero():
    spec = load_recipe("sparse50_w4a4").weight
    x = _gaussian((4, 256), seed=8)
    res = quantize(x, spec)
    x_h = block_hadamard(x, 128)
    keep = _keep_of(x_h, 128)
    assert torch.equal(res.keep, keep)
    assert (res.values[~keep] == 0).all() and (res.values[keep] != 0).all()  # int4 has no zero level
    alpha = spec.gaussian_scale * (x_h.square() * keep).sum(-1, keepdim=True).div(128).sqrt()
    torch.testing.assert_close(res.scale, alpha, rtol=1e-6, atol=0)
    on_grid, codes, _ = round_to_grid(x_h, res.scale, spec.fmt)
    assert torch.equal(res.values[keep], on_grid[keep])
    assert (codes[keep] % 2 == 1).all() and (codes[keep].abs() <= 15).all()


def test_storage_bits():
    assert TensorSpec().storage_bits(1024) == 16
    assert TensorSpec(format="int4").storage_bits(128) == 4 + 32 / 128
    assert TensorSpec(structure="2:4").storage_bits(1024) == (2 * 16 + 3) / 4
    assert TensorSpec(sparsity=0.5).storage_bits(1024) == (512 * 16 + 1024) / 1024  # the bitmap is smaller
    assert TensorSpec(sparsity=0.9).storage_bits(1024) == (102 * 16 + 102 * 10) / 1024  # positions are smaller
    assert TensorSpec(sparsity=0.9, structure="tensor").storage_bits(1024) == pytest.approx(
        (102.4 * 16 + 1024) / 1024)
    assert TensorSpec(format="int4", group=32).storage_bits(1024) == 4 + 32 / 1024 + 16 / 32
    assert TensorSpec(format="int4", outliers=0.01).storage_bits(1024) == 4 + 32 / 1024 + 10 * (16 + 10) / 1024


@pytest.mark.parametrize(("role", "data", "expected"), [
    ("weight", {"structure": "4:2"}, r"weight\.structure='4:2' is not allowed.*1 <= N < M"),
    ("weight", {"structure": "0:4"}, r"weight\.structure='0:4' is not allowed"),
    ("weight", {"structure": "a:b"}, r"weight\.structure='a:b' is not allowed.*row, tensor"),
    ("weight", {"structure": 124}, r"weight\.structure=124.*quote it in YAML"),
    ("weight", {"structure": "2:4", "sparsity": 0.5}, r"weight\.sparsity=0\.5 must be 0 with structure='2:4'"),
    ("weight", {"sparsity": 1.0}, r"weight\.sparsity=1\.0 is not allowed; allowed: a fraction in \[0, 1\)"),
    ("weight", {"sparsity": -0.1}, r"weight\.sparsity=-0\.1 is not allowed"),
    ("weight", {"sparsity": "half"}, r"weight\.sparsity='half' is not allowed"),
    ("weight", {"sparsity": 0.5, "sparse_rule": "topk"}, r"weight\.sparse_rule='topk'.*magnitude, rbbm, rigl"),
    ("weight", {"sparsity": 0.5, "band": 0.1}, r"weight\.band=0\.1 is only allowed with sparse_rule='rbbm'"),
    ("weight", {"sparsity": 0.5, "sparse_rule": "rbbm", "band": 0.5}, r"weight\.band=0\.5.*\[0, 0\.5\)"),
    ("weight", {"sparse_rule": "rbbm"}, r"weight\.sparse_rule='rbbm' needs sparsity > 0"),
    ("weight", {"structure": "2:4", "sparse_rule": "rigl"}, r"weight\.sparse_rule='rigl' needs sparsity > 0"),
    ("weight", {"sparsity": 0.5, "schedule": "linear"}, r"weight\.schedule='linear'.*constant, cubic"),
    ("weight", {"sparsity": 0.5, "schedule": "cubic", "ramp": 0}, r"weight\.ramp=0 is not allowed.*\(0, 1\]"),
    ("weight", {"sparsity": 0.5, "ramp": 0.3}, r"weight\.ramp=0\.3 is only allowed with schedule='cubic'"),
    ("weight", {"sparsity": 0.5, "sparse_rule": "rigl", "update_every": 0}, r"weight\.update_every=0.*>= 1"),
    ("weight", {"sparsity": 0.5, "sparse_rule": "rigl", "drop_fraction": 1.0}, r"weight\.drop_fraction=1\.0"),
    ("weight", {"sparsity": 0.5, "sparse_rule": "rigl", "rigl_stop": 0}, r"weight\.rigl_stop=0 is not allowed"),
    ("weight", {"sparsity": 0.5, "drop_fraction": 0.5}, r"weight\.drop_fraction=0\.5 is only allowed with.*rigl"),
    ("weight", {"format": "int4", "sparsity": 0.5, "sparse_rule": "rigl"}, r"weight\.sparse_rule='rigl'.*rotation"),
    ("weight", {"format": "int4", "group": 0}, r"weight\.group=0 is not allowed; allowed: a positive integer"),
    ("weight", {"group": 32}, r"weight\.group=32 needs a quantized format"),
    ("weight", {"format": "int4", "outliers": 1.0}, r"weight\.outliers=1\.0 is not allowed"),
    ("weight", {"format": "int4", "sparsity": 0.6, "outliers": 0.5}, r"weight\.outliers=0\.5 must be less than"),
    ("weight", {"format": "int4", "scale": "lsq", "sparsity": 0.5}, r"weight\.sparsity=0\.5 is not allowed with "
                                                                    r"scale='lsq'"),
    ("input", {"sparsity": 0.5, "sparse_rule": "rigl"}, r"input: sparse_rule='rigl' is only for the weight role"),
    ("input", {"sparsity": 0.5, "sparse_rule": "rbbm"}, r"input: sparse_rule='rbbm' is only for the weight role"),
    ("input", {"sparsity": 0.5, "schedule": "cubic"}, r"input: schedule='cubic' is only for the weight role"),
    ("input", {"sparsity": 0.5, "structure": "tensor"}, r"input: structure='tensor' is only for the weight role"),
])
def test_bad_values_fail_naming_the_field(role, data, expected):
    with pytest.raises(ValueError, match=expected):
        Recipe.from_dict({"name": "bad", role: data})


def test_in_features_must_fit_groups_and_nm():
    with pytest.raises(ValueError, match=r"q_proj.*structure='2:3' needs groups of M=3.*in_features=128"):
        TensorSpec(structure="2:3").check_in_features(128, "q_proj")
    with pytest.raises(ValueError, match=r"q_proj.*group=48 does not divide in_features=128.*32, 64, 128"):
        Recipe(weight=TensorSpec(format="int4", group=48)).check_in_features(128, "q_proj")
    TensorSpec(format="int4", group=32, structure="4:8").check_in_features(128, "q_proj")


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_presets_round_trip_and_compress(name):
    recipe = load_recipe(name)
    assert recipe.name == name and Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.compressed and (recipe.weight.sparse or recipe.weight.group or recipe.weight.outliers)


def test_recipes_recorded_before_the_fields_existed_load_unchanged():
    old = {"format": "int4", "scale": "gaussian_rms", "grad": "trust", "clip": None, "rotation": "hadamard",
           "block": 128}
    recipe = Recipe.from_dict({"name": "quest_w4a4", "weight": old, "input": old})
    assert recipe == load_recipe("quest_w4a4")
    assert not recipe.weight.sparse and recipe.weight.group is None and recipe.weight.outliers == 0
    assert not load_recipe("bf16").compressed and load_recipe("sparse50_magnitude").compressed
    assert not load_recipe("sparse50_magnitude").quantized


def test_triton_falls_back_naming_the_field():
    reason = triton_unsupported_reason(load_recipe("sparse50_magnitude"))
    assert reason == "weight: sparsity 0.5 (structure row, rule magnitude) runs only on the reference path"
    assert triton_unsupported_reason(load_recipe("sparse_2of4")).startswith("weight: sparsity 2:4 (rule magnitude)")
    assert triton_unsupported_reason(load_recipe("quest_w4a4_g32")).startswith("weight: group 32 runs only")
    input_only = Recipe(weight=TensorSpec(format="int4"), input=TensorSpec(format="int4", outliers=0.01))
    assert triton_unsupported_reason(input_only).startswith("input: outliers 0.01 runs only")
    choice = select_backend(load_recipe("rigl50"), torch.zeros(2, 8), torch.zeros(4, 8), "triton")
    assert choice.backend == "reference" and choice.reason.startswith("no Triton kernel: weight: sparsity 0.5")
