"""Law forms: published constants, factorization, gradients, and the budget arithmetic of predictions."""

from __future__ import annotations

import numpy as np
import pytest

from bitlaw.kernels.recipe import load_recipe
from bitlaw.scaling.laws import (
    PUBLISHED_GMSE,
    capacity,
    gmse_capacity,
    gmse_spec_capacity,
    make_law,
    predict_loss,
    weight_storage_bits,
)
from bitlaw.scaling.predict import budget_point, rank_recipes

from .synthetic import EXTRA, RECIPES, SHARED, true_capacity, true_loss


def test_published_constants_give_the_published_int4_and_int2_capacities():
    # docs/scaling-laws.md §3: with (L_c, F, C) = (1, 0.41, 1.39), rho(INT4) = 0.8196, rho(INT2) = 0.4445, per format.
    assert PUBLISHED_GMSE == {"L_c": 1.0, "F": 0.41, "C": 1.39}
    assert round(gmse_spec_capacity("int4", **PUBLISHED_GMSE), 4) == 0.8196
    assert round(gmse_spec_capacity("int2", **PUBLISHED_GMSE), 4) == 0.4445
    assert gmse_spec_capacity("bf16", **PUBLISHED_GMSE) == 1.0
    # Factorization: a weight-only recipe carries one format's capacity, W4A4 the product of both roles'.
    rho4 = gmse_spec_capacity("int4", **PUBLISHED_GMSE)
    assert gmse_capacity(load_recipe("quest_w4"), **PUBLISHED_GMSE) == pytest.approx(rho4, rel=1e-12)
    assert gmse_capacity(load_recipe("quest_w4a4"), **PUBLISHED_GMSE) == pytest.approx(rho4**2, rel=1e-12)
    assert gmse_capacity(load_recipe("bf16"), **PUBLISHED_GMSE) == 1.0


@pytest.mark.parametrize("form", ["decoupled", "gmse", "factorized", "kumar"])
def test_capacity_and_loss_match_the_reference_formulas(form):
    params = {**SHARED, **EXTRA[form]}
    for name in RECIPES:
        recipe = load_recipe(name)
        # rel 1e-7: the GMSE of docs/numerics.md §2 is given to 10 digits; kernels.formats computes it exactly.
        assert capacity(form, params, recipe) == pytest.approx(true_capacity(form, params, name), rel=1e-7)
        assert predict_loss(form, params, recipe, 3e7, 2e9) == pytest.approx(true_loss(form, params, name, 3e7, 2e9),
                                                                              rel=1e-7)


def test_decoupled_capacity_of_an_unfitted_recipe_is_an_error_naming_the_fitted_ones():
    params = {**SHARED, **EXTRA["decoupled"]}
    with pytest.raises(ValueError, match=r"'quest_w3a3' was not fitted; allowed: bf16, quest_w4a4, quest_w2a2"):
        capacity("decoupled", params, load_recipe("quest_w3a3"))
    with pytest.raises(ValueError,
                       match=r"law form 'chinchilla' is not allowed; allowed: decoupled, gmse, factorized, kumar"):
        capacity("chinchilla", params, load_recipe("bf16"))


@pytest.mark.parametrize("form,points", [("decoupled", [[0.8, 0.4, 0.15, 0.6], [0.3, 0.9, 0.5, 1.2]]),
                                         ("gmse", [[1.0, 0.41, 1.39], [0.7, 0.9, 0.6]]),
                                         ("kumar", [[1.8, 1.1], [0.5, 3.0]])])
def test_log_capacity_gradient_matches_finite_differences(form, points):
    law = make_law(form, [load_recipe(name) for name in RECIPES])
    extra = np.array(points, dtype=float)
    log_rho, jac = law.log_capacity(extra)
    step = 1e-6
    for p in range(extra.shape[1]):
        bumped = extra.copy()
        bumped[:, p] += step
        numeric = (law.log_capacity(bumped)[0] - log_rho) / step
        np.testing.assert_allclose(jac[:, :, p], numeric, rtol=1e-4, atol=1e-6)
    assert np.all(log_rho[:, 0] == 0.0)  # bf16 is the reference: rho = 1


def test_memory_budget_gives_low_bit_recipes_more_parameters():
    params = {**SHARED, **EXTRA["gmse"]}
    recipes = {name: load_recipe(name) for name in ("bf16", "quest_w4a4", "quest_w2")}
    rows = rank_recipes("gmse", params, recipes, memory_bytes=1e8, D=2e10)
    by_name = {row.name: row for row in rows}
    # Storage bits: the format's bits plus one fp32 scale per row of STORAGE_ROW entries.
    assert by_name["bf16"].N == 8e8 / 16 and by_name["quest_w4a4"].N == pytest.approx(8e8 / (4 + 32 / 4096))
    assert by_name["quest_w2"].N == pytest.approx(8e8 / (2 + 32 / 4096))
    expected = sorted(recipes, key=lambda n: true_loss("gmse", params, n, by_name[n].N, 2e10))
    assert [row.name for row in rows] == expected
    assert all(row.loss == pytest.approx(true_loss("gmse", params, row.name, row.N, 2e10)) for row in rows)


def test_memory_budget_credits_sparse_storage():
    # 50 % of a 4096-entry bf16 row survives: 2048 values of 16 bits plus a 4096-bit bitmap (smaller than 2048
    # positions of 12 bits) = 9 bits per element; 2:4 stores 2 values per 4 plus log2 C(4, 2) -> 3 bits per group.
    assert weight_storage_bits(load_recipe("sparse50_magnitude")) == 9.0
    assert weight_storage_bits(load_recipe("sparse_2of4")) == (2 * 16 + 3) / 4
    N, _ = budget_point(load_recipe("sparse50_magnitude"), memory_bytes=9e8, D=1e10)
    assert N == 8e8


def test_compute_budget_charges_each_flop_by_the_wider_operand():
    recipe = load_recipe("quest_w4a4")
    N, D = budget_point(recipe, compute_flops=6e18, ratio=100.0)
    assert 6 * N * D * 4 / 16 == pytest.approx(6e18) and D == pytest.approx(100 * N)
    N, D = budget_point(load_recipe("quest_w2"), compute_flops=6e18, D=1e10)  # weight-only: bf16 matmuls
    assert (N, D) == (pytest.approx(1e8), 1e10)
    N, D = budget_point(recipe, compute_flops=6e18, D=1e10, cost="flat")
    assert N == pytest.approx(1e8)
    with pytest.raises(ValueError, match="exactly one of D .* or ratio"):
        budget_point(recipe, compute_flops=6e18, D=1e10, ratio=100.0)
    with pytest.raises(ValueError, match="cost model 'watts' is not allowed; allowed: bits, flat"):
        budget_point(recipe, compute_flops=6e18, D=1e10, cost="watts")
    with pytest.raises(ValueError, match="a memory budget needs D"):
        budget_point(recipe, memory_bytes=1e8)
