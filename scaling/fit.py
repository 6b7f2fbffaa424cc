"""Robust fitting of the law forms to a run table: Huber on log loss, multi-start L-BFGS-B, bootstrap intervals.

The objective is Σ_i Huber_δ(log L_i − log L̂_i) with L̂ from :mod:`scaling.laws`, parametrised by a = log A,
b = log B, e = log E, α, β and the form's own parameters (docs/scaling-laws.md §6; δ = 1e-3 by default as in Chinchilla
and QuEST, 1e-4 in the Unified paper).

Multi-start: the grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25} (4,500 points) is crossed
with the form's starting points (``Law.starts``, 3–9 of them) and *screened* in one vectorised pass; L-BFGS-B
(analytic gradient) then runs from the ``refine`` lowest screened points (16 by default; ``refine=None`` runs it
from every point: the full published procedure, tens of thousands of L-BFGS-B runs) and the **lowest** final
objective is kept.

Uncertainty: ``bootstrap`` resamples of the runs (with replacement, from ``numpy.random.default_rng(seed)``), each
refitted from the best point; intervals are the 15.9th–84.1st percentiles (1 σ) and ``sigma`` the standard
deviation. Everything is deterministic given the seed (the Monte Carlo GMSE values some recipes need are seeded
too, :mod:`kernels.gmse`). The decoupled fit also measures the factorization error of every composite recipe whose
parts were trained alone, with the same resamples (:mod:`scaling.factorization`).

Identifiability is checked before fitting: warnings (Python ``warnings`` with :class:`IdentifiabilityWarning`,
and the result's ``warnings`` list) when all runs share one D/N ratio (α and E), there are fewer than 3 distinct
sizes or token counts (values within 10 % count as one), or the recipes cannot pin the form's own parameters;
ValueError when there are fewer runs than free parameters. After fitting, a parameter at a bound of its search
range or with a very wide bootstrap interval is warned about too (:func:`fitted_warnings`), and so is a capacity
the runs pull past ρ = 1 by more than their noise (:func:`cap_warnings`; the bounds keep every fitted ρ in (0, 1],
see :mod:`scaling.laws`).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.stats import chi2

from ..kernels.gmse import recipe_components
from ..kernels.recipe import Recipe
from .factorization import factorization_errors
from .laws import FORMS, RHO_MAX, SHARED, SHARED_PUBLIC, UNCAPPED_MAX, Decoupled, Law, make_law
from .runs import Run, check_recipe_names, levels, recipes_of

DEFAULT_DELTA = 1e-3
SHARED_GRID = {"a": np.arange(0.0, 25.1, 5.0), "alpha": np.arange(0.0, 2.01, 0.5), "b": np.arange(0.0, 25.1, 5.0),
               "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5)}
SHARED_BOUNDS = [(None, None), (0.0, 4.0), (None, None), (0.0, 4.0), (-10.0, 5.0)]  # a, b free (centred inside)
DEFAULT_REFINE = 16
MIN_DISTINCT = 3  # sizes / token counts below which α or β is only weakly identified
_SCREEN_CHUNK = 2_000_000  # elements per vectorised screening block (memory bound, ~16 MB per array)
CAP_TEST_LEVEL = 0.05  # p-value below which the runs' pull past ρ = 1 is more than their noise (cap_warnings)


class IdentifiabilityWarning(UserWarning):
    """The runs cannot (or can barely) identify a parameter of the law."""


@dataclass
class FitResult:
    """One fitted form. ``params``/``intervals``/``sigma`` use public names (A, alpha, B, beta, E, then the form's
    own); ``capacity`` maps each recipe of the table to ρ; ``rmse`` is on the loss (nats/token).

    ``components``: recipe → its components as fitted (role, type, and the GMSE record of
    :class:`kernels.gmse.GMSE`), so a reader sees which GMSE values (exact or Monte Carlo) the law used.
    ``notes``: what the form leaves unfitted by design (e.g. a compression type no run has).
    ``factorization``: decoupled only, the rows of :func:`scaling.factorization.factorization_errors`.
    """

    form: str
    params: dict[str, float]
    intervals: dict[str, list[float]]
    sigma: dict[str, float]
    capacity: dict[str, float]
    capacity_intervals: dict[str, list[float]]
    rmse: float
    objective: float
    n_runs: int
    n_params: int
    delta: float
    bootstrap: int
    seed: int
    warnings: list[str] = field(default_factory=list)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    components: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    factorization: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Problem:
    """Arrays of a run table and one law: objective and gradient of the (δ-scaled) Huber loss.

    Internally log N and log D are centred (a' = a − α·mean log N, b' = b − β·mean log D): the same model, but
    without the strong a–α and b–β correlation that makes L-BFGS-B crawl. ``to_internal``/``to_external`` convert.
    """

    def __init__(self, runs: Sequence[Run], law: Law, delta: float):
        self.law, self.delta = law, delta
        index = {name: i for i, name in enumerate(law.names)}
        log_n, log_d = np.log([r.N for r in runs]), np.log([r.D for r in runs])
        self.center_n, self.center_d = float(log_n.mean()), float(log_d.mean())
        self.log_n, self.log_d = log_n - self.center_n, log_d - self.center_d
        self.log_loss = np.log([r.loss for r in runs])
        self.recipe = np.array([index[r.recipe_name] for r in runs])
        self.bounds = [*SHARED_BOUNDS, *law.bounds]

    def to_internal(self, theta: np.ndarray) -> np.ndarray:
        out = np.array(theta, dtype=float)
        out[..., 0] -= out[..., 1] * self.center_n
        out[..., 2] -= out[..., 3] * self.center_d
        return out

    def to_external(self, theta: np.ndarray) -> np.ndarray:
        out = np.array(theta, dtype=float)
        out[..., 0] += out[..., 1] * self.center_n
        out[..., 2] += out[..., 3] * self.center_d
        return out

    def log_pred(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Internal theta ``[S, 5 + P]`` → (log L̂ ``[S, R]``, d log L̂ / d theta ``[S, R, 5 + P]``)."""
        a, alpha, b, beta, e = (theta[:, i:i + 1] for i in range(5))
        log_rho, jac_rho = self.law.log_capacity(theta[:, 5:])
        log_eff_n = self.log_n + log_rho[:, self.recipe]
        terms = np.stack([a - alpha * log_eff_n, b - beta * self.log_d, np.broadcast_to(e, log_eff_n.shape)])
        log_l = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])
        w1, w2, w3 = np.exp(terms - log_l)  # each term's share of L̂
        grad = np.empty((*log_l.shape, theta.shape[1]))
        grad[..., 0], grad[..., 1] = w1, -w1 * log_eff_n
        grad[..., 2], grad[..., 3], grad[..., 4] = w2, -w2 * self.log_d, w3
        grad[..., 5:] = (-alpha * w1)[..., None] * jac_rho[:, self.recipe, :]
        return log_l, grad

    def huber(self, residual: np.ndarray) -> np.ndarray:
        """Huber_δ / δ: the 1/δ scale keeps L-BFGS-B's tolerances meaningful when δ is small."""
        small = np.abs(residual) <= self.delta
        return np.where(small, 0.5 * residual**2 / self.delta, np.abs(residual) - 0.5 * self.delta)

    def screen(self, shared: np.ndarray, extra: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Scaled objective ``[G, K]`` at every (shared grid row, form start) pair; no gradient, bounded memory.

        ``shared`` rows are internal (a', α, b', β, e)."""
        out = np.empty((len(shared), len(extra)))
        log_rho, _ = self.law.log_capacity(extra)
        step = max(1, _SCREEN_CHUNK // max(1, len(self.log_n)))
        for k in range(len(extra)):
            log_eff_n = self.log_n + log_rho[k, self.recipe]
            for start in range(0, len(shared), step):
                a, alpha, b, beta, e = (shared[start:start + step, i:i + 1] for i in range(5))
                log_l = np.logaddexp(np.logaddexp(a - alpha * log_eff_n, b - beta * self.log_d), e)
                out[start:start + step, k] = self.huber(self.log_loss - log_l) @ weights
        return out

    def value_and_grad(self, theta: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        log_l, grad = self.log_pred(theta[None, :])
        residual = self.log_loss - log_l[0]
        psi = np.clip(residual, -self.delta, self.delta) / self.delta
        return float(self.huber(residual) @ weights), -(weights * psi) @ grad[0]

    def refine(self, theta0: np.ndarray, weights: np.ndarray,
               bounds: list[tuple[float | None, float | None]] | None = None) -> tuple[np.ndarray, float]:
        """L-BFGS-B from internal ``theta0`` within ``bounds`` (default: the fit's); returns (internal theta,
        scaled objective)."""
        result = minimize(self.value_and_grad, theta0, args=(weights,), jac=True, method="L-BFGS-B",
                          bounds=self.bounds if bounds is None else bounds,
                          options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
        return result.x, float(result.fun)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with one OpenBLAS thread in this thread (OpenBLAS's thread-local setting; restored after).

    Why: L-BFGS-B on these ~10-parameter problems makes thousands of tiny BLAS calls, and waking a second
    OpenBLAS thread for each made fits ~10× slower on a busy 2-core machine. Where no OpenBLAS with
    ``openblas_set_num_threads_local`` is loaded (other BLAS, non-Linux), this does nothing.
    """
    maps = Path("/proc/self/maps")
    setters = []
    if maps.is_file():
        paths = sorted({line.split()[-1] for line in maps.read_text().splitlines()
                        if "openblas" in line.lower() and line.split()[-1].startswith("/")})
        for path in paths:
            library = ctypes.CDLL(path)
            if hasattr(library, "openblas_set_num_threads_local"):
                setters.append(library.openblas_set_num_threads_local)
    previous = [setter(1) for setter in setters]
    try:
        yield
    finally:
        for setter, value in zip(setters, previous, strict=True):
            setter(value)


def _grid() -> np.ndarray:
    """The shared multi-start grid ``[4500, 5]`` in the order of :data:`SHARED`."""
    return np.array(list(itertools.product(*(SHARED_GRID[name] for name in SHARED))))


def _public(theta: np.ndarray, law: Law) -> dict[str, float]:
    a, alpha, b, beta, e = (float(v) for v in theta[:5])
    values = dict(zip(SHARED_PUBLIC, (math.exp(a), alpha, math.exp(b), beta, math.exp(e)), strict=True))
    values.update(zip(law.extra_names, (float(v) for v in theta[5:]), strict=True))
    return values


def identifiability_warnings(runs: Sequence[Run], law: Law) -> list[str]:
    """What the table cannot identify: one D/N ratio, too few sizes or token counts, the form's own gaps.

    Values within 10 % count as one level (:func:`scaling.runs.levels`)."""
    out = []
    ratios = [r.D / r.N for r in runs]
    if len(levels(ratios)) == 1:
        out.append(f"all runs share one D/N ratio ({min(ratios):.4g} … {max(ratios):.4g}): N and D move together, "
                   "so alpha and E are not identifiable; add runs at other D/N ratios")
    for symbol, what, names in (("N", "model sizes", "A and alpha"), ("D", "token counts", "B and beta")):
        distinct = len(levels([getattr(r, symbol) for r in runs]))
        if distinct < MIN_DISTINCT:
            level = "not identifiable" if distinct == 1 else "weakly identified"
            out.append(f"only {distinct} distinct {what} ({symbol}): {names} are {level}; use ≥ {MIN_DISTINCT}")
    return out + law.coverage_warnings(Counter(r.recipe_name for r in runs))


def _law_for(runs: Sequence[Run], form: str) -> tuple[Law, list[str]]:
    """The law ``form`` over the recipes of ``runs`` and its parameter names; ValueError when there are no runs,
    two recipes share a name, or there are fewer runs than parameters."""
    if not runs:
        raise ValueError("no runs to fit")
    check_recipe_names(runs)
    law = make_law(form, list(recipes_of(runs).values()))
    names = [*SHARED_PUBLIC, *law.extra_names]
    if len(runs) < len(names):
        raise ValueError(f"{form} law: fewer runs ({len(runs)}) than free parameters ({len(names)}: "
                         f"{', '.join(names)}); add runs or fit a form with fewer parameters")
    return law, names


def fit_law(runs: Sequence[Run], form: str, delta: float = DEFAULT_DELTA, bootstrap: int = 100, seed: int = 0,
            refine: int | None = DEFAULT_REFINE) -> FitResult:
    """Fit the law ``form`` (one of :data:`scaling.laws.FORMS`) to ``runs``; see the module docstring.

    Raises ValueError for an unknown form, δ ≤ 0, bootstrap < 0, refine < 1, or fewer runs than free parameters.
    """
    if form not in FORMS:
        raise ValueError(f"law form {form!r} is not allowed; allowed: {', '.join(FORMS)}")
    if not (isinstance(delta, int | float) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta={delta!r} is not allowed; allowed: a positive number (1e-3 or 1e-4)")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap!r} is not allowed; allowed: an integer ≥ 0 (resamples)")
    if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 1):
        raise ValueError(f"refine={refine!r} is not allowed; allowed: an integer ≥ 1 or None (every grid point)")
    law, names = _law_for(runs, form)
    recipes = recipes_of(runs)
    messages = identifiability_warnings(runs, law)
    for message in messages:
        warnings.warn(message, IdentifiabilityWarning, stacklevel=2)

    with one_blas_thread():
        result = _fit(runs, law, recipes, names, messages, delta, bootstrap, seed, refine)
    for message in result.warnings[len(messages):]:  # what the fitted values revealed
        warnings.warn(message, IdentifiabilityWarning, stacklevel=2)
    return result


def _fit(runs: Sequence[Run], law: Law, recipes: dict, names: list[str], messages: list[str], delta: float,
         bootstrap: int, seed: int, refine: int | None) -> FitResult:
    problem = _Problem(runs, law, delta)
    ones = np.ones(len(runs))
    shared, extra = problem.to_internal(_grid()), (law.starts if law.starts.size else np.zeros((1, 0)))
    screened = problem.screen(shared, extra, ones).ravel()
    order = np.argsort(screened, kind="stable")
    best_theta, best_value = None, math.inf
    for index in order if refine is None else order[:refine]:
        g, k = divmod(int(index), len(extra))
        theta, value = problem.refine(np.concatenate([shared[g], extra[k]]), ones)
        if value < best_value:  # keep the LOWEST objective over all starts
            best_theta, best_value = theta, value

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        weights = np.bincount(rng.integers(0, len(runs), len(runs)), minlength=len(runs)).astype(float)
        samples.append(problem.refine(best_theta, weights)[0])

    params = _public(problem.to_external(best_theta), law)
    capacity = {name: float(law.capacity(params, recipe)) for name, recipe in recipes.items()}
    intervals: dict[str, list[float]] = {}
    sigma: dict[str, float] = {}
    capacity_intervals: dict[str, list[float]] = {}
    table = [_public(problem.to_external(theta), law) for theta in samples]
    if samples:
        for name in names:
            values = np.array([row[name] for row in table])
            intervals[name] = [float(v) for v in np.percentile(values, [15.865, 84.135])]
            sigma[name] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for recipe_name, recipe in recipes.items():
            values = np.array([law.capacity(row, recipe) for row in table])
            capacity_intervals[recipe_name] = [float(v) for v in np.percentile(values, [15.865, 84.135])]
    log_l, _ = problem.log_pred(best_theta[None, :])
    rmse = float(np.sqrt(np.mean((np.exp(log_l[0]) - np.exp(problem.log_loss)) ** 2)))
    messages = [*messages, *fitted_warnings(problem, best_theta, params, intervals),
                *cap_warnings(problem, best_theta, recipes)]
    return FitResult(form=law.name, params=params, intervals=intervals, sigma=sigma, capacity=capacity,
                     capacity_intervals=capacity_intervals, rmse=rmse, objective=best_value * delta,
                     n_runs=len(runs), n_params=len(names), delta=float(delta), bootstrap=bootstrap, seed=seed,
                     warnings=messages, recipes={name: r.to_dict() for name, r in recipes.items()},
                     components={name: [{"role": c.role, "type": c.type, "gmse": c.gmse.to_dict()}
                                        for c in recipe_components(recipe)] for name, recipe in recipes.items()},
                     notes=law.notes(),
                     factorization=(factorization_errors(recipes, law.capacity, params, table)
                                    if isinstance(law, Decoupled) else []))


def fitted_warnings(problem: _Problem, theta: np.ndarray, params: dict[str, float],
                    intervals: dict[str, list[float]]) -> list[str]:
    """What the fitted values show the runs could not pin (the design checks cannot see noise or a wrong regime):

    - a parameter with no effect: moving it by 10 % (0.1 for log A, log B, log E) moves no predicted log loss by
      a tenth of δ, e.g. ρ or γ once α is 0 (its bootstrap interval collapses, so only this says it);
    - a parameter at (within 1 % of) a bound of its search range (its interval collapses there too), except a
      capped parameter at its cap ρ ≤ 1 (``Law.capped``): that bound is the definition of ρ, not the end of a
      search, and :func:`cap_warnings` says whether the runs pull past it;
    - a 1σ interval spanning more than a factor 10 (A, B, E) or wider than the value itself (the rest).

    ``theta`` is the internal optimum; ``params``/``intervals`` public, in the same order."""
    base = problem.log_pred(theta[None, :])[0][0]
    out = []
    for index, (name, (low, high)) in enumerate(zip(params, problem.bounds, strict=True)):
        if name in problem.law.capped:
            high = None  # its upper bound is the cap: cap_warnings, not "the runs do not pin it"
        value = params[name]
        step = 0.1 if index in (0, 2, 4) else 0.1 * max(abs(theta[index]), 0.1)
        moves = []
        for sign in (1.0, -1.0):
            moved = theta.copy()
            moved[index] = np.clip(theta[index] + sign * step, low if low is not None else -np.inf,
                                   high if high is not None else np.inf)
            moves.append(np.max(np.abs(problem.log_pred(moved[None, :])[0][0] - base)))
        # L-BFGS-B approaches a bound the objective keeps pulling at without always landing on it exactly.
        at = [bound for bound in (low, high) if bound is not None
              and abs(theta[index] - bound) <= max(0.01 * abs(bound), 1e-4)]
        if max(moves) < 0.1 * problem.delta:
            out.append(f"{name} = {value:.4g} has no effect on the fitted losses: the runs do not pin it")
        elif at:
            out.append(f"{name} = {value:.4g} sits at the bound of its search range; the runs do not pin it")
        elif name in intervals:
            lo, hi = intervals[name]
            if (hi > 10 * lo) if name in ("A", "B", "E") else (hi - lo > abs(value)):
                out.append(f"{name} = {value:.4g} is poorly identified (1σ interval [{lo:.4g}, {hi:.4g}])")
    return [f"{problem.law.name}: {message}" for message in out]


def cap_warnings(problem: _Problem, theta: np.ndarray, recipes: dict[str, Recipe]) -> list[str]:
    """A message when the runs pull a capacity past ρ = 1 by more than their noise; else none.

    The capped parameters (``Law.capped``) that end within 1 % of their cap are freed up to
    :data:`scaling.laws.UNCAPPED_MAX` and refitted once from ``theta`` (the internal optimum, all runs). Whether
    the freed fit is better by more than the noise is the robust likelihood-ratio ("drop in dispersion") test of
    Schrader & Hettmansperger (1980) for Huber fits: S = 2·(H_capped − H_free)/τ, with H the Huber objective and
    τ = E[ψ²]/E[ψ'] from the freed fit's residuals r, ψ = clip(r, −δ, δ). E[ψ²] is Σψ²/(n − p); E[ψ'], the share
    of residuals within δ, is 2Φ(δ/σ̂) − 1 with σ̂ = 1.4826·median|r| rather than a count, because with δ far below
    the noise (δ = 1e-4) only a run or two fall within δ and a count made the test fire on noise. S is ΔSSR/σ̂²
    when every residual is within δ and the least-absolute-deviation test when none is.
    S is compared with χ² on k degrees of freedom, k the freed parameters that moved past the cap;
    with the true value on the cap the null law is a mixture of χ² with fewer degrees of freedom, so the p-value
    would be conservative if the asymptotics held; at 75 runs they hold roughly: of 100 synthetic tables with
    every truth on the cap (0.3 % noise), 2 % (decoupled) and 5 % (gmse, whose L_c, F, C are strongly
    correlated) gave p < 0.05. Below :data:`CAP_TEST_LEVEL` the message names each freed parameter and its free
    value and every recipe of ``recipes`` whose ρ would exceed 1, so a pull of 1.01 reads as what it is.

    Why not always warn: a recipe that costs nothing (ρ = 1) or the published L_c = 1.0 puts the truth on the
    cap, and half of such fits end there by noise alone.
    """
    law, ones = problem.law, np.ones(len(problem.log_loss))
    capped = [5 + law.extra_names.index(name) for name in law.capped]
    at_cap = [i for i in capped if theta[i] >= 0.99 * RHO_MAX]  # L-BFGS-B may stop just short of a bound
    if not at_cap:
        return []
    bounds = [(low, UNCAPPED_MAX) if i in at_cap else (low, high) for i, (low, high) in enumerate(problem.bounds)]
    free_theta, free_value = problem.refine(theta, ones, bounds)
    moved = [i for i in at_cap if free_theta[i] > RHO_MAX]
    if not moved:
        return []
    residual = problem.log_loss - problem.log_pred(free_theta[None, :])[0][0]
    psi = np.clip(residual, -problem.delta, problem.delta)
    scale = 1.4826 * float(np.median(np.abs(residual)))  # Gaussian σ from the median absolute residual
    inside = math.erf(problem.delta / (scale * math.sqrt(2.0))) if scale > 0 else 1.0  # 2Φ(δ/σ̂) − 1
    tau = (psi @ psi / max(len(residual) - len(theta), 1)) / inside
    drop = (problem.value_and_grad(theta, ones)[0] - free_value) * problem.delta  # unscaled Huber objectives
    statistic = 2.0 * drop / tau if tau > 0 else math.inf
    p_value = float(chi2.sf(statistic, len(moved)))
    if p_value >= CAP_TEST_LEVEL:
        return []
    free = _public(problem.to_external(free_theta), law)
    names = [law.extra_names[i - 5] for i in moved]
    # A freed value that ends at UNCAPPED_MAX is only a lower limit of where the runs would put it.
    values = ", ".join(f"{name} ≥ {UNCAPPED_MAX:g} (the end of the search)" if free[name] >= 0.99 * UNCAPPED_MAX
                       else f"{name} = {free[name]:.4g}" for name in names)
    over = {name: law.capacity(free, recipe) for name, recipe in recipes.items()}
    over_text = ", ".join(f"{name} ({rho:.4g})" for name, rho in over.items() if rho > RHO_MAX)
    return [f"{law.name}: {', '.join(names)} held at {RHO_MAX:g}, the upper bound that keeps ρ ≤ 1 (no recipe is "
            f"worth more parameters than bf16); without it the runs give {values}, i.e. ρ above 1 for "
            f"{over_text or 'formats finer than the fitted ones'} (robust likelihood-ratio test p = {p_value:.2g}): "
            "quantized runs better than bf16 at equal N and D point to weak bf16 runs, not to a better recipe"]


def fit_forms(runs: Sequence[Run], forms: Sequence[str] = FORMS, **kwargs: Any) -> dict[str, FitResult]:
    """:func:`fit_law` for each of ``forms``, keyed by form; the forms and their run counts are checked before
    anything is fitted."""
    unknown = [form for form in forms if form not in FORMS]
    if unknown or not forms:
        raise ValueError(f"law form(s) {unknown or forms!r} not allowed; allowed: {', '.join(FORMS)}")
    for form in forms:  # every form's run count before any (slow) fit
        _law_for(runs, form)
    return {form: fit_law(runs, form, **kwargs) for form in forms}
