"""Fitting: synthetic recovery per form, the Huber objective, determinism, multi-start, identifiability, errors."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

from bitlaw.kernels.recipe import load_recipe
from bitlaw.scaling import fit as scaling_fit
from bitlaw.scaling.fit import DEFAULT_DELTA, IdentifiabilityWarning, fit_law
from bitlaw.scaling.laws import capacity

from .synthetic import EXTRA, SHARED, make_runs, true_loss


def _fit_quietly(runs, form, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_law(runs, form, **kwargs)
    return result, [str(w.message) for w in caught if issubclass(w.category, IdentifiabilityWarning)]


@pytest.mark.parametrize("form", ["decoupled", "gmse", "kumar"])
def test_known_parameters_are_recovered_within_their_bootstrap_intervals(form):
    # 5 recipes (one weight-only) x 5 sizes x 3 D/N, 0.3 % noise on the log loss.
    runs = make_runs(form)
    truth = {**SHARED, **EXTRA[form]}
    result, messages = _fit_quietly(runs, form, bootstrap=24, seed=0)
    assert messages == [] and result.warnings == []
    assert set(result.params) == set(truth) == set(result.intervals) == set(result.sigma)
    for name, value in truth.items():
        fitted, sigma = result.params[name], result.sigma[name]
        low, high = result.intervals[name]
        assert low <= fitted <= high or math.isclose(low, high), (name, fitted, low, high)
        # Within 3 bootstrap sigma of the truth, and the intervals are tight enough for this to mean something.
        assert abs(fitted - value) <= 3 * sigma, (name, value, fitted, sigma)
        assert sigma <= 0.1 * abs(value), (name, value, sigma)
    assert result.rmse < 0.02  # loss ~2-4 nats, noise 0.3 %
    for recipe, rho in result.capacity.items():
        assert result.capacity_intervals[recipe][0] <= rho + 1e-12
        assert rho <= result.capacity_intervals[recipe][1] + 1e-12


def test_objective_is_the_huber_loss_of_log_residuals_with_the_reference_delta():
    # docs/scaling-laws.md §6: delta = 1e-3 (Chinchilla / QuEST) by default; 1e-4 (Unified) on request.
    assert DEFAULT_DELTA == 1e-3
    runs = make_runs("gmse", noise=0.01)
    for delta in (None, 1e-4):
        result, _ = _fit_quietly(runs, "gmse", bootstrap=0, **({} if delta is None else {"delta": delta}))
        delta = delta or 1e-3
        assert result.delta == delta
        residual = np.array([math.log(r.loss) - math.log(true_loss("gmse", result.params, r.recipe.name, r.N, r.D))
                             for r in runs])
        small = np.abs(residual) <= delta
        huber = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum()
        assert result.objective == pytest.approx(huber, rel=1e-6)
        assert 0 < small.sum() < len(runs)  # both branches of the Huber loss are exercised
        predicted = np.array([true_loss("gmse", result.params, r.recipe.name, r.N, r.D) for r in runs])
        assert result.rmse == pytest.approx(np.sqrt(np.mean((predicted - [r.loss for r in runs]) ** 2)), rel=1e-6)


def test_same_seed_same_result_other_seed_other_intervals():
    runs = make_runs("kumar", noise=0.01)
    first, _ = _fit_quietly(runs, "kumar", bootstrap=8, seed=3)
    again, _ = _fit_quietly(runs, "kumar", bootstrap=8, seed=3)
    other, _ = _fit_quietly(runs, "kumar", bootstrap=8, seed=4)
    assert first.to_dict() == again.to_dict()
    assert other.params == first.params and other.intervals != first.intervals


def test_multi_start_keeps_the_lowest_objective(monkeypatch):
    """Each refined start reports a made-up objective; the fit must keep the start whose objective is lowest,
    not the first, the last or the best screened one."""
    runs = make_runs("decoupled")
    made_up = iter([5.0, 3.0, 0.5, 2.0, 4.0])
    starts = []

    def fake_refine(self, theta0, weights):
        starts.append(np.array(theta0))
        return np.array(theta0), next(made_up)

    monkeypatch.setattr(scaling_fit._Problem, "refine", fake_refine)
    result, _ = _fit_quietly(runs, "decoupled", bootstrap=0, refine=5)
    assert len(starts) == 5
    problem = scaling_fit._Problem(runs, scaling_fit.make_law("decoupled", [r.recipe for r in runs[::15]]),
                                   DEFAULT_DELTA)
    kept = problem.to_external(starts[2])
    assert result.params["alpha"] == kept[1] and result.params["A"] == pytest.approx(math.exp(kept[0]))
    assert result.objective == pytest.approx(0.5 * DEFAULT_DELTA)
    assert len({tuple(s) for s in starts}) == 5  # five different starting points


def test_unidentifiable_designs_warn():
    one_ratio = make_runs("gmse", ratios=(20.0,))
    # Token budgets are rounded to whole steps: D/N of 20.0 and 20.3 are still one ratio.
    one_ratio[0] = type(one_ratio[0])(one_ratio[0].N, one_ratio[0].N * 20.3, one_ratio[0].loss, one_ratio[0].recipe,
                                      "rounded")
    _, messages = _fit_quietly(one_ratio, "gmse", bootstrap=0, refine=2)
    assert any("all runs share one D/N ratio" in m and "alpha and E are not identifiable" in m for m in messages)

    two_sizes = make_runs("gmse", sizes=(1e7, 1e8))
    _, messages = _fit_quietly(two_sizes, "gmse", bootstrap=0, refine=2)
    assert any("only 2 distinct model sizes (N): A and alpha are weakly identified" in m for m in messages)
    assert not any("D/N" in m for m in messages)

    one_format = make_runs("gmse", recipes=("bf16", "quest_w4a4", "quest_w4"))
    _, messages = _fit_quietly(one_format, "gmse", bootstrap=0, refine=2)
    assert any("≥ 3 distinct GMSE values; got 1" in m for m in messages)

    symmetric = make_runs("kumar", recipes=("bf16", "quest_w4a4", "quest_w2a2", "quest_w1a1"))
    _, messages = _fit_quietly(symmetric, "kumar", bootstrap=0, refine=2)
    assert any("gamma_w and gamma_a are interchangeable" in m for m in messages)

    no_bf16 = make_runs("decoupled", recipes=("quest_w4a4", "quest_w2a2", "quest_w1a1", "quest_w2"))
    _, messages = _fit_quietly(no_bf16, "decoupled", bootstrap=0, refine=2)
    assert any("no bf16 runs" in m for m in messages)


def test_fewer_runs_than_parameters_and_bad_arguments_are_errors():
    runs = make_runs("gmse")[:7]  # gmse has 8 parameters
    with pytest.raises(ValueError, match=r"gmse law: fewer runs \(7\) than free parameters \(8: A, alpha, B, beta, "
                                         r"E, L_c, F, C\)"):
        fit_law(runs, "gmse")
    runs = make_runs("gmse")
    with pytest.raises(ValueError,
                       match="law form 'power' is not allowed; allowed: decoupled, gmse, factorized, kumar"):
        fit_law(runs, "power")
    with pytest.raises(ValueError, match=r"delta=0 is not allowed"):
        fit_law(runs, "gmse", delta=0)
    with pytest.raises(ValueError, match=r"bootstrap=-1 is not allowed"):
        fit_law(runs, "gmse", bootstrap=-1)
    with pytest.raises(ValueError, match="no runs to fit"):
        fit_law([], "gmse")


def test_parameters_the_runs_cannot_pin_are_named_after_the_fit():
    """Quantization that costs nothing (every rho = 1, as in runs limited by optimization rather than capacity)
    passes every design check, but the tanh curve can only reach rho = 1 at a bound of its parameters."""
    free = {**SHARED, **{name: 1.0 for name in EXTRA["decoupled"]}}
    runs = make_runs("decoupled", params=free)
    result, messages = _fit_quietly(runs, "gmse", bootstrap=8, refine=4)
    assert messages and all(m.startswith(("gmse: L_c", "gmse: F", "gmse: C")) for m in messages), messages
    assert all(m.endswith("the runs do not pin it") or "poorly identified" in m for m in messages)
    assert result.warnings == messages  # the same messages are kept in fit.json
    assert all(rho == pytest.approx(1.0, abs=0.02) for rho in result.capacity.values())


def test_capacities_stay_in_0_1_and_runs_that_pull_past_1_are_named():
    """ρ is a fraction of bf16's parameters. Runs in which W4A4 beats bf16 (true ρ = 1.3, as a weak bf16 baseline
    would show) made the unbounded fits report ρ(W4A4) = 1.31 (decoupled) and L_c = 1.91, so ρ(W8A8) = 2.8 (gmse),
    without a warning: every form must stay in (0, 1], for unfitted recipes too, and the fit must say where the
    runs pulled, with values."""
    runs = make_runs("decoupled", params={**SHARED, **EXTRA["decoupled"], "rho[quest_w4a4]": 1.3})
    for form in ("decoupled", "gmse", "kumar"):
        result, messages = _fit_quietly(runs, form, bootstrap=4, refine=4)
        assert all(0 < rho <= 1 for rho in result.capacity.values()), (form, result.capacity)
        assert all(0 < low <= high <= 1 for low, high in result.capacity_intervals.values()), form
        if form != "decoupled":  # gmse and kumar also predict recipes that were never fitted
            assert 0 < capacity(form, result.params, load_recipe("quest_w8a8")) <= 1, form
        pulled = [m for m in messages if "held at 1, the upper bound that keeps ρ ≤ 1" in m]
        assert set(pulled) <= set(result.warnings)  # kept for fit.json and report.md too
        if form == "kumar":  # 1 − e^(−P/γ) < 1 by construction: nothing to hold
            assert pulled == []
            continue
        assert len(pulled) == 1 and "ρ above 1 for quest_w4a4 (" in pulled[0], (form, messages)
        held = "rho[quest_w4a4]" if form == "decoupled" else "L_c"
        assert pulled[0].startswith(f"{form}: {held} held at 1,") and result.params[held] == 1.0
        free = float(re.search(r"ρ above 1 for quest_w4a4 \(([0-9.]+)\)", pulled[0]).group(1))
        assert free == pytest.approx(1.3, abs=0.03)  # the unbounded value the runs point to
        assert not any("sits at the bound" in m for m in messages)  # ρ ≤ 1 is the definition, not a search limit


def test_a_capacity_on_one_within_the_noise_is_not_warned_about():
    """A recipe that costs nothing has ρ = 1 on the bound; half of such fits end there by noise alone, and that
    is no finding (the significance test of the pull past 1 is what keeps them quiet)."""
    lossless = {**SHARED, **{name: 1.0 for name in EXTRA["decoupled"]}}
    result, messages = _fit_quietly(make_runs("decoupled", params=lossless), "decoupled", bootstrap=4, refine=4)
    assert max(result.capacity.values()) == 1.0 and result.params["rho[quest_w4a4]"] == 1.0  # on the bound
    assert messages == [] and result.warnings == []
