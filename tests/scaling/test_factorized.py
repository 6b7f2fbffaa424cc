"""The factorized law (one tanh curve per compression type) and the factorization error of decoupled fits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe
from bitlaw.scaling.factorization import factorizations
from bitlaw.scaling.fit import IdentifiabilityWarning, fit_law
from bitlaw.scaling.laws import capacity, make_law, predict_loss

from .synthetic import EXTRA, RECIPES, SHARED, make_recipe, make_runs, true_capacity

# Quantization-only recipes, weight sparsity at four levels, and two composites whose parts are in the table.
MIXED = (*RECIPES, "sparse30", "sparse50", "sparse75", "sparse90", "sparse50_w4a4", "sparse75_w2a2")


def _fit_quietly(runs, form, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_law(runs, form, **kwargs)
    return result, [str(w.message) for w in caught if issubclass(w.category, IdentifiabilityWarning)]


def test_factorized_capacity_and_gradient_match_the_reference_formulas():
    params = {**SHARED, **EXTRA["factorized"]}
    for name in MIXED:
        assert capacity("factorized", params, make_recipe(name)) == pytest.approx(
            true_capacity("factorized", params, name), rel=1e-7)
    law = make_law("factorized", [make_recipe(name) for name in MIXED])
    assert law.extra_names == list(EXTRA["factorized"])
    extra = np.array([list(EXTRA["factorized"].values()), [0.8, 0.3, 0.9, 0.6, 1.1, 2.0]])
    log_rho, jac = law.log_capacity(extra)
    for p in range(extra.shape[1]):
        bumped = extra.copy()
        bumped[:, p] += 1e-6
        np.testing.assert_allclose(jac[:, :, p], (law.log_capacity(bumped)[0] - log_rho) / 1e-6, rtol=1e-4, atol=1e-6)


def test_known_parameters_of_both_types_are_recovered_and_exact_data_factorizes():
    """Losses from a factorized law with its own (L_c, F, C) for quantization and for sparsity, 0.3 % noise: every
    parameter within 3 bootstrap σ of the truth. The decoupled fit of the same law's noise-free losses finds each
    composite's ρ equal to the product of its parts' (the law factorizes by construction)."""
    truth = {**SHARED, **EXTRA["factorized"]}
    result, messages = _fit_quietly(make_runs("factorized", recipes=MIXED), "factorized", bootstrap=16, refine=8)
    assert messages == [] and result.warnings == [] and result.notes == []
    assert set(result.params) == set(truth)
    for name, value in truth.items():
        fitted, sigma = result.params[name], result.sigma[name]
        assert abs(fitted - value) <= 3 * sigma, (name, value, fitted, sigma)
        assert sigma <= 0.1 * abs(value), (name, value, sigma)
    # A recipe built from the fitted types but never trained is predicted.
    unseen = Recipe(name="sparse60_w3a3", weight=TensorSpec(format="int3", sparsity=0.6),
                    input=TensorSpec(format="int3"))
    assert 0 < predict_loss("factorized", result.params, unseen, 1e8, 1e10) < 10

    exact, _ = _fit_quietly(make_runs("factorized", recipes=MIXED, noise=0.0), "decoupled", bootstrap=4, refine=4)
    rows = {row["composite"]: row for row in exact.factorization}
    assert {name: row["parts"] for name, row in rows.items()} == {"sparse50_w4a4": ["quest_w4a4", "sparse50"],
                                                                  "sparse75_w2a2": ["quest_w2a2", "sparse75"]}
    for name, row in rows.items():
        assert row["rho"] == pytest.approx(true_capacity("factorized", truth, name), rel=1e-4)
        assert abs(row["relative_error"]) < 1e-4 and len(row["interval"]) == 2 and row["sigma"] >= 0


def test_a_product_that_does_not_hold_shows_as_a_factorization_error():
    """Decoupled truths with ρ(sparse50_w4a4) = 0.8 · ρ(sparse50) · ρ(quest_w4a4): the product overestimates the
    composite by 1/0.8 − 1 = 25 %, and the fit must measure that, with an interval that excludes 0."""
    rho = {"rho[quest_w4a4]": 0.78, "rho[sparse50]": 0.7, "rho[sparse50_w4a4]": 0.8 * 0.78 * 0.7}
    runs = make_runs("decoupled", params={**SHARED, **rho}, recipes=("bf16", "quest_w4a4", "sparse50", "sparse50_w4a4"))
    result, _ = _fit_quietly(runs, "decoupled", bootstrap=16, refine=4)
    (row,) = result.factorization
    assert row["composite"] == "sparse50_w4a4" and row["parts"] == ["quest_w4a4", "sparse50"]
    assert row["relative_error"] == pytest.approx(0.25, abs=3 * row["sigma"])
    assert row["interval"][0] > 0.1


def test_a_type_without_runs_is_left_unfitted_and_named():
    runs = make_runs("gmse")  # quantization only
    factorized, _ = _fit_quietly(runs, "factorized", bootstrap=0, refine=4)
    gmse, _ = _fit_quietly(runs, "gmse", bootstrap=0, refine=4)
    assert set(factorized.params) == {*SHARED, "L_c[quantization]", "F[quantization]", "C[quantization]"}
    assert factorized.notes == ["factorized: no run has a sparsity component, so L_c[sparsity], F[sparsity], "
                                "C[sparsity] are not fitted; recipes with sparsity cannot be predicted from this fit"]
    # With one type present the factorized law is the gmse law under other names.
    for name in ("L_c", "F", "C"):
        assert factorized.params[f"{name}[quantization]"] == pytest.approx(gmse.params[name], rel=1e-6)
    with pytest.raises(ValueError, match=r"factorized law: recipe 'sparse50' has a sparsity component \(weight\), "
                                         r"but L_c\[sparsity\], F\[sparsity\], C\[sparsity\] were not fitted \(no "
                                         r"run had one\); allowed: recipes whose components are all of the fitted "
                                         r"types \(quantization\)"):
        capacity("factorized", factorized.params, make_recipe("sparse50"))


def test_the_single_curve_forms_say_what_they_do_with_sparsity():
    law = make_law("gmse", [make_recipe(name) for name in MIXED])
    assert law.extra_names == ["L_c", "F", "C"]
    counts = dict.fromkeys(MIXED, 15)
    assert any("sparsity components share the one (L_c, F, C) of quantization" in m
               for m in law.coverage_warnings(counts))
    kumar = make_law("kumar", [make_recipe(name) for name in MIXED]).coverage_warnings(counts)
    assert any(m.startswith("kumar: the form counts bits only and does not see the sparsity of sparse30")
               for m in kumar)
    few = make_law("factorized", [make_recipe(name) for name in ("bf16", "quest_w4a4", "quest_w2", "sparse50")])
    assert few.coverage_warnings(counts) == [
        "factorized: L_c[quantization], F[quantization], C[quantization] need components with ≥ 3 distinct GMSE "
        "values; got 2, so the tanh curve is not identifiable (add recipes with other formats or sparsities)",
        "factorized: L_c[sparsity], F[sparsity], C[sparsity] need components with ≥ 3 distinct GMSE values; got 1, "
        "so the tanh curve is not identifiable (add recipes with other formats or sparsities)"]
    # The decoupled form gives a sparse bf16 recipe its own free ρ (it is compressed, though not quantized).
    assert make_law("decoupled", [make_recipe(name) for name in ("bf16", "sparse50")]).extra_names == ["rho[sparse50]"]


def test_factorizations_pair_each_composite_with_the_recipes_trained_alone():
    a4 = Recipe(name="quest_a4", input=load_recipe("quest_w4a4").input)
    names = ("bf16", "quest_w4", "quest_w4a4", "ste_w4a4", "quest_w4_rotated", "sparse50", "sparse50_w4",
             "sparse50_w4a4")
    recipes = {name: make_recipe(name) for name in names} | {"quest_a4": a4}
    assert factorizations(recipes) == [
        ("quest_w4a4", ("quest_w4", "quest_a4")),
        ("sparse50_w4", ("quest_w4", "sparse50")),
        ("sparse50_w4a4", ("quest_w4a4", "sparse50")),
        ("sparse50_w4a4", ("sparse50_w4", "quest_a4")),
        ("sparse50_w4a4", ("quest_w4", "sparse50", "quest_a4")),
    ]
    # ste_w4a4 trains with another gradient rule, quest_w4_rotated with another layout: parts of nothing.
    assert all("ste_w4a4" not in (c, *p) and "quest_w4_rotated" not in (c, *p) for c, p in factorizations(recipes))
    # The presets: 50 % magnitude sparsity of bf16 weights is the sparsity of sparse50_w4a4 (pruned there in the
    # rotated domain, which the Gaussian GMSE does not see); RBBM and RigL at 50 % are other training rules.
    presets = {name: load_recipe(name) for name in ("bf16", "quest_w4a4", "sparse50_rbbm", "rigl50",
                                                    "sparse50_magnitude", "sparse50_w4a4")}
    assert factorizations(presets) == [("sparse50_w4a4", ("quest_w4a4", "sparse50_magnitude"))]
