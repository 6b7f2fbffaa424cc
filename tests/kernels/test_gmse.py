"""GMSE of any tensor spec: closed forms where they exist, a seeded Monte Carlo of the reference quantizer
elsewhere, and the decomposition of a recipe into components."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from bitlaw.kernels.formats import gmse, nm_sparsity_gmse, sparsity_gmse
from bitlaw.kernels.gmse import GMSE, monte_carlo_gmse, recipe_components, spec_gmse
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe


def within(estimate: GMSE, exact: float, sigmas: float = 3.0) -> bool:
    return abs(estimate.value - exact) <= sigmas * estimate.stderr


def test_sparsity_gmse_at_one_half_is_the_closed_form_and_the_monte_carlo_agrees():
    # s − 2tφ(t), t = Φ⁻¹((1 + s)/2), written out here independently of kernels.formats.
    t = NormalDist().inv_cdf(0.75)
    closed = 0.5 - 2 * t * NormalDist().pdf(t)
    assert round(closed, 4) == 0.0713 and sparsity_gmse(0.5) == pytest.approx(closed, rel=1e-12)
    exact = spec_gmse(TensorSpec(sparsity=0.5))
    assert exact == GMSE(sparsity_gmse(0.5), 0.0, "exact", 0, None)
    for structure in ("row", "tensor"):
        measured = monte_carlo_gmse(TensorSpec(sparsity=0.5, structure=structure), samples=256)
        assert measured.method == "monte-carlo" and 0 < measured.stderr < 0.01 * closed
        assert within(measured, closed), (structure, measured)
    nm = monte_carlo_gmse(TensorSpec(structure="2:4"), samples=256)
    assert spec_gmse(TensorSpec(structure="2:4")).value == nm_sparsity_gmse(2, 4) and within(nm, nm_sparsity_gmse(2, 4))


@pytest.mark.parametrize("name", ["int2", "int4", "ternary", "fp4_e2m1"])
def test_monte_carlo_gmse_of_a_grid_matches_its_exact_gmse(name):
    # Long rows (8192 values), so the O(1/in_features) effect of a per-row RMS (−0.04 % at int4) stays far
    # below the standard error (about 0.3 %); the next test shows the same comparison failing on short rows.
    measured = monte_carlo_gmse(TensorSpec(format=name), in_features=8192, samples=256)
    assert measured.samples == 256 and measured.in_features == 8192
    assert 0 < measured.stderr < 0.005 * gmse(name)
    assert within(measured, gmse(name)), (name, measured, gmse(name))


def test_short_rows_lower_the_gmse_of_a_per_row_rms_scale():
    """A row divided by its own RMS has lighter tails than N(0, 1): on 128-value rows int4's MSE is 2.7 % below
    the infinite-row value, many standard errors away (so the comparison above can fail)."""
    measured = monte_carlo_gmse(TensorSpec(format="int4"), in_features=128, samples=32768)
    assert measured.value < gmse("int4") - 10 * measured.stderr
    assert measured.value == pytest.approx(gmse("int4") * (1 - 0.027), rel=4 * measured.stderr / measured.value)


@pytest.mark.parametrize("spec,exact", [
    (TensorSpec(), 0.0),
    (TensorSpec(format="int4"), gmse("int4")),
    (TensorSpec(format="int4", rotation="none", grad="ste"), gmse("int4")),
    (TensorSpec(format="fp4_e2m1", grad="clip", clip=1.5), gmse("fp4_e2m1")),
    (TensorSpec(format="int4z"), gmse("int4z")),
    (TensorSpec(sparsity=0.75, structure="tensor"), sparsity_gmse(0.75)),
    (TensorSpec(sparsity=0.5, sparse_rule="rbbm", band=0.1), sparsity_gmse(0.5)),
    (TensorSpec(sparsity=0.5, sparse_rule="rigl"), sparsity_gmse(0.5)),
    (TensorSpec(structure="4:8"), nm_sparsity_gmse(4, 8)),
])
def test_closed_forms_are_used_where_they_exist(spec, exact):
    assert spec_gmse(spec) == GMSE(exact)


@pytest.mark.parametrize("spec", [
    TensorSpec(format="int4", scale="absmax"),
    TensorSpec(format="int4", scale="lsq"),
    TensorSpec(format="int4", scale="lsq_step"),
    TensorSpec(format="int4", group=32),
    TensorSpec(format="int4", outliers=0.01),
    TensorSpec(format="int4", sparsity=0.5),
    TensorSpec(format="int4", rotation="none", sparsity=0.5, sparse_rule="rigl"),
])
def test_everything_else_is_measured(spec):
    result = spec_gmse(spec, samples=64)
    assert result.method == "monte-carlo" and result.samples == 64 and result.in_features == 1024
    assert 0 < result.stderr < 0.05 * result.value


def test_what_the_monte_carlo_measures():
    """Rotation leaves N(0, 1) rows N(0, 1): with or without it, absmax int4 measures the same GMSE (on different
    draws). A learned ``lsq`` scale starts at the Gaussian-optimal α of the tensor, hence the format's GMSE;
    absmax clips at the row's maximum, far above the optimal clip, and costs more."""
    rotated = monte_carlo_gmse(TensorSpec(format="int4", scale="absmax"), samples=256)
    plain = monte_carlo_gmse(TensorSpec(format="int4", scale="absmax", rotation="none"), samples=256)
    assert rotated.value != plain.value
    assert abs(rotated.value - plain.value) <= 3 * math.hypot(rotated.stderr, plain.stderr)
    assert rotated.value > 1.4 * gmse("int4")
    assert within(monte_carlo_gmse(TensorSpec(format="int4", scale="lsq"), samples=256), gmse("int4"))
    # Sparsity and quantization together: the survivors are quantized with a scale of their own, so the error is
    # below the sum of the parts' errors but above either.
    both = monte_carlo_gmse(TensorSpec(format="int4", sparsity=0.5), samples=256).value
    assert sparsity_gmse(0.5) + 0.5 * gmse("int4") < both < sparsity_gmse(0.5) + gmse("int4")


def test_monte_carlo_is_deterministic_for_a_seed():
    spec = TensorSpec(format="int3", scale="absmax", group=64)
    first = monte_carlo_gmse(spec, samples=64, seed=3)
    assert monte_carlo_gmse(spec, samples=64, seed=3) == first
    assert monte_carlo_gmse(spec, samples=64, seed=4).value != first.value
    assert spec_gmse(spec, samples=64, seed=3) == first
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:  # the estimate runs on one thread whatever the caller's setting, and leaves that setting alone
        assert monte_carlo_gmse(spec, samples=64, seed=3) == first
        assert torch.get_num_threads() == (2 if threads == 1 else 1)
    finally:
        torch.set_num_threads(threads)


def test_a_recipe_splits_into_its_components():
    recipe = Recipe(name="sparse50_w4a4", weight=TensorSpec(format="int4", sparsity=0.5, sparse_rule="rbbm", band=0.2),
                    input=TensorSpec(format="int4"))
    parts = recipe_components(recipe)
    assert [(c.role, c.type) for c in parts] == [("weight", "sparsity"), ("weight", "quantization"),
                                                 ("input", "quantization")]
    assert parts[0].spec == TensorSpec(sparsity=0.5, sparse_rule="rbbm", band=0.2)
    assert parts[1].spec == TensorSpec(format="int4") == parts[2].spec
    assert [c.gmse for c in parts] == [GMSE(sparsity_gmse(0.5)), GMSE(gmse("int4")), GMSE(gmse("int4"))]
    # The same component in two recipes has one key: quest_w4's weight is quest_w4a4's.
    assert recipe_components(load_recipe("quest_w4"))[0].key == recipe_components(load_recipe("quest_w4a4"))[0].key
    assert recipe_components(load_recipe("bf16")) == []
    measured = recipe_components(load_recipe("absmax_w4a4"), samples=64)
    assert [c.gmse.method for c in measured] == ["monte-carlo"] * 2


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match=r"samples=100 is not allowed; allowed: a multiple of 32"):
        spec_gmse(TensorSpec(format="int4"), samples=100)
    with pytest.raises(ValueError, match=r"block=128 does not divide in_features=96"):
        monte_carlo_gmse(TensorSpec(format="int4"), in_features=96, samples=32)
    with pytest.raises(ValueError, match=r"represents its tensor exactly; its GMSE is 0"):
        monte_carlo_gmse(TensorSpec(), samples=32)
