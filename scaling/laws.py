"""Precision scaling-law forms: Chinchilla with a capacity ρ(R) per training recipe (docs/scaling-laws.md §1).

    L(N, D, R) = A / (N · ρ(R))^α + B / D^β + E,   ρ(bf16) = 1,   A = e^a, B = e^b, E = e^e.

Forms of ρ:

- ``decoupled`` (QuEST): one free efficiency ``rho[<recipe>]`` per quantized recipe.
- ``gmse`` (Unified): ρ(spec) = L_c · tanh(F · log_{1/4} GMSE(spec))^C for each quantized tensor spec, factorized
  over the roles: ρ(R) = ρ(weight spec) · ρ(input spec); a bf16 spec contributes 1. GMSE comes from
  :func:`kernels.formats.gmse` of the spec's format (it assumes the Gaussian-optimal scale, so ``absmax`` or
  ``lsq`` recipes, or ``noht_w4a4``, get the capacity of the same format under QuEST scaling).
- ``kumar`` (Kumar et al.): ρ(R) = Π_x (1 − e^(−P_x/γ_x)) over x ∈ {weight, input}, P_x the storage bits of
  that role's format; a bf16 role contributes 1. Fitted: ``gamma_w``, ``gamma_a``.

Capacity range: ρ is the fraction of bf16's parameters a recipe is worth, so ρ ∈ (0, 1]. Each form keeps it there
by construction, for every recipe it can be asked about (fitted or not), rather than flagging values outside: a flag
beside a ρ above 1 would still let a prediction rank a quantized recipe above bf16.

- ``decoupled``: ``rho[...]`` is searched in [1e-4, 1]; the parameter *is* the capacity, so its bound is the range.
- ``gmse``: ``L_c`` is searched in [1e-3, 1]. GMSE < 1 makes F · log_{1/4} GMSE positive, so tanh(…)^C ∈ (0, 1)
  and every spec's ρ ∈ (0, L_c], formats never fitted included. L_c is the capacity of the error-free limit
  (ρ → L_c as GMSE → 0); L_c > 1 would make a fine format (int8) worth more than bf16, whose ρ is 1 by
  definition. The published L_c = 1.0 ± 0.7 (docs/scaling-laws.md §3) puts the central value on this bound: its
  upper half is what their runs could not exclude, not evidence for L_c > 1, and the bound removes only values
  that contradict the definition. Its cost: when the runs are consistent with L_c ≈ 1, about half the fits end at
  L_c = 1 with a one-sided bootstrap interval; the fit then tests whether the runs pull past the bound by more
  than their noise and says so when they do (:func:`scaling.fit.cap_warnings`).
- ``kumar``: 1 − e^(−P/γ) ∈ (0, 1) for every γ > 0, so ρ ∈ (0, 1) without any bound.

``Law.capped`` names the parameters whose upper bound is this cap. A ``fit.json`` written before these bounds (or
edited) can still hold a ρ outside (0, 1]; :func:`capacity_range_warning` is the message ``bitlaw-fit predict``
and the report give for one.

A :class:`Law` is built for the distinct recipes of a run table and evaluates log ρ and its gradient for many
parameter vectors at once (the fit screens thousands of starting points in one pass).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from bitlaw.kernels.formats import get_format, gmse
from bitlaw.kernels.recipe import Recipe, TensorSpec

FORMS = ("decoupled", "gmse", "kumar")
SHARED = ("a", "alpha", "b", "beta", "e")  # fitted coordinates; reported as A = e^a, alpha, B = e^b, beta, E = e^e
SHARED_PUBLIC = ("A", "alpha", "B", "beta", "E")
ROLES = ("weight", "input")
PUBLISHED_GMSE = {"L_c": 1.0, "F": 0.41, "C": 1.39}  # Llama / C4, scalar quantization (docs/scaling-laws.md §1)
RHO_MAX = 1.0  # ρ(bf16) = 1 and no recipe is worth more parameters than bf16: the upper end of (0, 1]
UNCAPPED_MAX = 10.0  # a capped parameter's upper bound when the fit measures how far the runs pull past RHO_MAX


def capacity_in_range(rho: float) -> bool:
    """Whether ``rho`` lies in (0, 1], the range of a capacity (False for NaN)."""
    return 0.0 < rho <= RHO_MAX


def capacity_range_warning(form: str, recipe: str, rho: float) -> str:
    """The message for a capacity ``rho`` of ``recipe`` under ``form`` that lies outside (0, 1].

    The fit cannot produce one (module docstring), so it comes from a ``fit.json`` written without the bounds or
    edited by hand."""
    return (f"{form}: ρ = {rho:.4g} for {recipe} is outside (0, 1], the range of a capacity (a fraction of bf16's "
            "parameters); this fit.json was written without the bound ρ ≤ 1 or edited: refit it")


def log_quarter(x: float | np.ndarray) -> float | np.ndarray:
    """log base 1/4: −ln x / ln 4 (1 per 4× reduction of the MSE below 1)."""
    return -np.log(x) / math.log(4.0)


def spec_log_quarter_gmse(spec: TensorSpec) -> float:
    """log_{1/4} GMSE of a quantized spec's format; ValueError when GMSE ≥ 1 (the tanh form needs it positive)."""
    value = gmse(spec.format)
    if not 0.0 < value < 1.0:
        raise ValueError(f"format {spec.format!r}: GMSE {value} is outside (0, 1); the GMSE law needs it there")
    return float(log_quarter(value))


def tanh_capacity(gmse_value: float | np.ndarray, L_c: float, F: float, C: float) -> float | np.ndarray:
    """The Unified law's capacity of one quantized tensor: L_c · tanh(F · log_{1/4} GMSE)^C (GMSE in (0, 1))."""
    return L_c * np.tanh(F * log_quarter(gmse_value)) ** C


def gmse_spec_capacity(format_name: str, L_c: float, F: float, C: float) -> float:
    """ρ of one tensor spec in ``format_name`` (:func:`tanh_capacity` of its GMSE); 1.0 for bf16."""
    if get_format(format_name).is_identity:
        return 1.0
    spec = TensorSpec(format=format_name)
    spec_log_quarter_gmse(spec)  # raises for a GMSE outside (0, 1)
    return float(tanh_capacity(gmse(spec.format), L_c, F, C))


def gmse_capacity(recipe: Recipe, L_c: float, F: float, C: float) -> float:
    """ρ(R) = ρ(weight spec) · ρ(input spec) under the GMSE law (factorization)."""
    return math.prod(gmse_spec_capacity(getattr(recipe, role).format, L_c, F, C) for role in ROLES)


def kumar_capacity(recipe: Recipe, gamma_w: float, gamma_a: float) -> float:
    """N_eff / N = Π_x (1 − e^(−P_x/γ_x)) over quantized roles (P_x: storage bits of the role's format)."""
    out = 1.0
    for role, gamma in (("weight", gamma_w), ("input", gamma_a)):
        fmt = getattr(recipe, role).fmt
        if not fmt.is_identity:
            out *= -math.expm1(-fmt.bits / gamma)
    return out


def recipe_bits(recipe: Recipe) -> tuple[int, int]:
    """Storage bits per element of (weight, input); 16 for bf16."""
    return recipe.weight.fmt.bits, recipe.input.fmt.bits


class Law(ABC):
    """One capacity form over a fixed list of distinct recipes.

    ``extra_names``/``bounds``/``starts`` describe the form's own parameters (beyond a, α, b, β, e); ``starts`` is a
    ``[K, P]`` array of starting values the fit crosses with its grid of shared parameters. ``capped`` names the
    parameters whose upper bound is :data:`RHO_MAX` because it keeps ρ ≤ 1 (module docstring), not because the
    search has to stop somewhere.
    """

    name = ""
    extra_names: list[str]
    bounds: list[tuple[float, float]]
    starts: np.ndarray
    capped: list[str]

    def __init__(self, recipes: Sequence[Recipe]):
        if not recipes:
            raise ValueError(f"{self.name}: no recipes to fit")
        self.recipes = list(recipes)
        self.names = [r.name for r in self.recipes]

    @abstractmethod
    def log_capacity(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``extra`` ``[S, P]`` → (log ρ ``[S, n_recipes]``, d log ρ / d extra ``[S, n_recipes, P]``)."""

    @staticmethod
    @abstractmethod
    def capacity(params: dict[str, float], recipe: Recipe) -> float:
        """ρ of ``recipe`` under fitted ``params`` (public names); any recipe for gmse/kumar."""

    @abstractmethod
    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        """Messages for the form's parameters that the recipes present cannot identify."""


class Decoupled(Law):
    """One free efficiency ``rho[name]`` per quantized recipe, in [1e-4, 1]; bf16 (no quantized role) is fixed
    to 1."""

    name = "decoupled"
    min_runs_per_recipe = 3

    def __init__(self, recipes: Sequence[Recipe]):
        super().__init__(recipes)
        self.free = [i for i, r in enumerate(self.recipes) if r.quantized]
        self.extra_names = [f"rho[{self.names[i]}]" for i in self.free]
        self.bounds = [(1e-4, RHO_MAX)] * len(self.free)
        self.capped = list(self.extra_names)
        self.starts = np.array([[v] * len(self.free) for v in (0.3, 0.6, 0.9)]).reshape(3, len(self.free))

    def log_capacity(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        S, P = extra.shape
        log_rho = np.zeros((S, len(self.recipes)))
        jac = np.zeros((S, len(self.recipes), P))
        for p, i in enumerate(self.free):
            log_rho[:, i] = np.log(extra[:, p])
            jac[:, i, p] = 1.0 / extra[:, p]
        return log_rho, jac

    @staticmethod
    def capacity(params: dict[str, float], recipe: Recipe) -> float:
        if not recipe.quantized:
            return 1.0
        key = f"rho[{recipe.name}]"
        if key not in params:
            fitted = [k[4:-1] for k in params if k.startswith("rho[")]
            raise ValueError(f"decoupled law: recipe {recipe.name!r} was not fitted; allowed: bf16, "
                             f"{', '.join(fitted)} (or use the gmse/kumar form, which covers any recipe)")
        return params[key]

    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        out = []
        if all(self.recipes[i].quantized for i in range(len(self.recipes))):
            out.append("decoupled: no bf16 runs, so every rho[...] trades off against A (ρ is relative to bf16)")
        for i in self.free:
            count = runs_per_recipe[self.names[i]]
            if count < self.min_runs_per_recipe:
                out.append(f"decoupled: rho[{self.names[i]}] rests on {count} run(s); need ≥ "
                           f"{self.min_runs_per_recipe} to be identified beyond the noise")
        return out


class GMSE(Law):
    """ρ(R) = Π over quantized roles of L_c · tanh(F · log_{1/4} GMSE(spec))^C, with L_c ≤ 1 so that every
    format's ρ ≤ 1 (module docstring)."""

    name = "gmse"
    extra_names = ["L_c", "F", "C"]
    bounds = [(1e-3, RHO_MAX), (1e-3, 20.0), (1e-3, 20.0)]
    capped = ["L_c"]
    starts = np.array([[1.0, f, c] for f in (0.2, 0.4, 0.8) for c in (0.7, 1.4, 2.1)])

    def __init__(self, recipes: Sequence[Recipe]):
        super().__init__(recipes)
        # g = log_{1/4} GMSE of each quantized role, per recipe (0, 1 or 2 entries).
        self.g = [[spec_log_quarter_gmse(getattr(r, role)) for role in ROLES if getattr(r, role).quantized]
                  for r in self.recipes]

    def log_capacity(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L_c, F, C = extra[:, 0], extra[:, 1], extra[:, 2]
        log_rho = np.zeros((len(extra), len(self.recipes)))
        jac = np.zeros((len(extra), len(self.recipes), 3))
        for i, gs in enumerate(self.g):
            for g in gs:
                x = F * g
                log_tanh = np.log(np.tanh(x))
                log_rho[:, i] += np.log(L_c) + C * log_tanh
                jac[:, i, 0] += 1.0 / L_c
                jac[:, i, 1] += 2.0 * C * g / np.sinh(2.0 * x)  # d/dF of C·log tanh(Fg)
                jac[:, i, 2] += log_tanh
        return log_rho, jac

    @staticmethod
    def capacity(params: dict[str, float], recipe: Recipe) -> float:
        return gmse_capacity(recipe, params["L_c"], params["F"], params["C"])

    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        # Three parameters need ρ at three GMSE values; w2a2 beside w2 adds no new value (ρ² of the same ρ).
        distinct = {round(g, 9) for gs in self.g for g in gs}
        if len(distinct) < 3:
            return [f"gmse: L_c, F, C need quantized formats with ≥ 3 distinct GMSE values; got {len(distinct)}, "
                    "so the tanh curve is not identifiable (add recipes in other formats)"]
        return []


class Kumar(Law):
    """ρ(R) = Π_x (1 − e^(−P_x/γ_x)), x ∈ {weight, input}; bf16 roles contribute 1. ρ < 1 for any γ > 0, so
    nothing is capped."""

    name = "kumar"
    extra_names = ["gamma_w", "gamma_a"]
    bounds = [(1e-2, 50.0), (1e-2, 50.0)]
    capped = []
    starts = np.array([[w, a] for w in (0.7, 1.5, 3.0) for a in (0.7, 1.5, 3.0)])

    def __init__(self, recipes: Sequence[Recipe]):
        super().__init__(recipes)
        self.bits = [[getattr(r, role).fmt.bits if getattr(r, role).quantized else 0 for role in ROLES]
                     for r in self.recipes]

    def log_capacity(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_rho = np.zeros((len(extra), len(self.recipes)))
        jac = np.zeros((len(extra), len(self.recipes), 2))
        for i, bits in enumerate(self.bits):
            for p, P in enumerate(bits):
                if P:
                    gamma = extra[:, p]
                    log_rho[:, i] += np.log(-np.expm1(-P / gamma))
                    jac[:, i, p] += -(P / gamma**2) / np.expm1(P / gamma)
        return log_rho, jac

    @staticmethod
    def capacity(params: dict[str, float], recipe: Recipe) -> float:
        return kumar_capacity(recipe, params["gamma_w"], params["gamma_a"])

    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        out = []
        for p, (role, name) in enumerate((("weights", "gamma_w"), ("inputs", "gamma_a"))):
            if not any(bits[p] for bits in self.bits):
                out.append(f"kumar: no recipe quantizes the {role}, so {name} is not identifiable (it stays near "
                           "its starting value)")
        quantized = [bits for bits in self.bits if any(bits)]
        if quantized and all(bits_w == bits_a for bits_w, bits_a in quantized):
            # ρ is then symmetric in (γ_w, γ_a): swapping them fits equally well.
            out.append("kumar: every quantized recipe has the same bits on weights and inputs, so gamma_w and "
                       "gamma_a are interchangeable; add a weight-only recipe (e.g. quest_w2) to tell them apart")
        return out


LAWS: dict[str, type[Law]] = {"decoupled": Decoupled, "gmse": GMSE, "kumar": Kumar}


def make_law(form: str, recipes: Sequence[Recipe]) -> Law:
    """The :class:`Law` called ``form`` (one of :data:`FORMS`) over ``recipes``."""
    if form not in LAWS:
        raise ValueError(f"law form {form!r} is not allowed; allowed: {', '.join(FORMS)}")
    return LAWS[form](recipes)


def chinchilla_loss(params: dict[str, float], N: float | np.ndarray, D: float | np.ndarray,
                    rho: float | np.ndarray) -> float | np.ndarray:
    """A / (N·ρ)^α + B / D^β + E with the public parameter names (A, alpha, B, beta, E)."""
    return (params["A"] / (np.asarray(N) * rho) ** params["alpha"] + params["B"] / np.asarray(D) ** params["beta"]
            + params["E"])


def capacity(form: str, params: dict[str, float], recipe: Recipe) -> float:
    """ρ of ``recipe`` under the fitted ``params`` of ``form``."""
    if form not in LAWS:
        raise ValueError(f"law form {form!r} is not allowed; allowed: {', '.join(FORMS)}")
    return LAWS[form].capacity(params, recipe)


def predict_loss(form: str, params: dict[str, float], recipe: Recipe, N: float, D: float) -> float:
    """Predicted loss of a run of ``recipe`` with ``N`` non-embedding parameters on ``D`` tokens."""
    for what, value in (("N", N), ("D", D)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{what}={value!r} is not allowed; allowed: a positive finite number")
    return float(chinchilla_loss(params, N, D, capacity(form, params, recipe)))
