"""Precision scaling-law forms: Chinchilla with a capacity ρ(R) per training recipe (docs/scaling-laws.md §1).

    L(N, D, R) = A / (N · ρ(R))^α + B / D^β + E,   ρ(bf16) = 1,   A = e^a, B = e^b, E = e^e.

A recipe is a product of *components* (:func:`kernels.gmse.recipe_components`): the quantization of a role, or
its sparsity, each with the Gaussian MSE (GMSE) of that compression alone. Forms of ρ:

- ``decoupled`` (QuEST): one free efficiency ``rho[<recipe>]`` per compressed recipe.
- ``gmse`` (Unified, one compression type): ρ(R) = Π over components of L_c · tanh(F · log_{1/4} GMSE_c)^C with one
  (L_c, F, C) for every component: weights and inputs, and sparsity too when runs have it (the paper gives
  sparsity its own curve: compare with ``factorized``).
- ``factorized`` (Unified, per type): the same product with a separate ``(L_c[t], F[t], C[t])`` per component
  type t (``quantization``, ``sparsity``). A type no run has stays unfitted: its parameters are absent, and a
  recipe with such a component cannot be predicted from the fit (ValueError naming the type).
- ``kumar`` (Kumar et al.): ρ(R) = Π_x (1 − e^(−P_x/γ_x)) over x ∈ {weight, input}, P_x the storage bits of
  that role's format; a bf16 role contributes 1. Fitted: ``gamma_w``, ``gamma_a``. It does not see sparsity.

The GMSE of a quantized spec is that of its whole rule (:func:`kernels.gmse.spec_gmse`): the format's exact
value for Gaussian-optimal RMS scales, a seeded Monte Carlo value for ``absmax``/``lsq`` scales, groups and
outliers, so e.g. ``absmax_w4a4`` gets a larger GMSE, hence a smaller ρ, than ``quest_w4a4``.

Capacity range: ρ is the fraction of bf16's parameters a recipe is worth, so ρ ∈ (0, 1]. Each form keeps it there
by construction, for every recipe it can be asked about (fitted or not), rather than flagging values outside: a flag
beside a ρ above 1 would still let a prediction rank a quantized recipe above bf16.

- ``decoupled``: ``rho[...]`` is searched in [1e-4, 1]; the parameter *is* the capacity, so its bound is the range.
- ``gmse``/``factorized``: every ``L_c`` is searched in [1e-3, 1]. GMSE < 1 makes F · log_{1/4} GMSE positive, so
  tanh(…)^C ∈ (0, 1) and every component's ρ ∈ (0, L_c], formats never fitted included. L_c is the capacity of the
  error-free limit (ρ → L_c as GMSE → 0); L_c > 1 would make a fine format (int8) worth more than bf16, whose ρ is 1
  by definition. The published L_c = 1.0 ± 0.7 (docs/scaling-laws.md §3) puts the central value on this bound: its
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

from ..kernels.formats import get_format, gmse
from ..kernels.gmse import COMPONENT_TYPES, Component, recipe_components
from ..kernels.recipe import Recipe

FORMS = ("decoupled", "gmse", "factorized", "kumar")
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


def component_log_quarter_gmse(component: Component) -> float:
    """log_{1/4} GMSE of one component; ValueError when its GMSE is outside (0, 1) (the tanh form needs it so)."""
    value = component.gmse.value
    if not 0.0 < value < 1.0:
        raise ValueError(f"{component.role} {component.type} component (format {component.spec.format!r}): GMSE "
                         f"{value} is outside (0, 1); the GMSE law needs it there")
    return float(log_quarter(value))


def tanh_capacity(gmse_value: float | np.ndarray, L_c: float, F: float, C: float) -> float | np.ndarray:
    """The Unified law's capacity of one component: L_c · tanh(F · log_{1/4} GMSE)^C (GMSE in (0, 1))."""
    return L_c * np.tanh(F * log_quarter(gmse_value)) ** C


def gmse_spec_capacity(format_name: str, L_c: float, F: float, C: float) -> float:
    """ρ of one tensor in ``format_name`` at its Gaussian-optimal scale (:func:`tanh_capacity` of the format's
    exact GMSE); 1.0 for bf16. ValueError for a GMSE outside (0, 1)."""
    if get_format(format_name).is_identity:
        return 1.0
    value = gmse(format_name)
    if not 0.0 < value < 1.0:
        raise ValueError(f"format {format_name!r}: GMSE {value} is outside (0, 1); the GMSE law needs it there")
    return float(tanh_capacity(value, L_c, F, C))


def gmse_capacity(recipe: Recipe, L_c: float, F: float, C: float) -> float:
    """ρ(R) = Π over the recipe's components of :func:`tanh_capacity` (one curve for all: the ``gmse`` form)."""
    return GMSE.capacity({"L_c": L_c, "F": F, "C": C}, recipe)


def compressed(recipe: Recipe) -> bool:
    """Whether any role of ``recipe`` is quantized or sparse (bf16 is not: its ρ is 1 by definition)."""
    return any(getattr(recipe, role).compressed for role in ROLES)


def kumar_capacity(recipe: Recipe, gamma_w: float, gamma_a: float) -> float:
    """N_eff / N = Π_x (1 − e^(−P_x/γ_x)) over quantized roles (P_x: storage bits of the role's format)."""
    out = 1.0
    for role, gamma in (("weight", gamma_w), ("input", gamma_a)):
        fmt = getattr(recipe, role).fmt
        if not fmt.is_identity:
            out *= -math.expm1(-fmt.bits / gamma)
    return out


def recipe_bits(recipe: Recipe) -> tuple[int, int]:
    """Format bits per element of (weight, input); 16 for bf16. The width a matmul runs at, not what a compressed
    weight costs to store (:func:`weight_storage_bits`)."""
    return recipe.weight.fmt.bits, recipe.input.fmt.bits


STORAGE_ROW = 4096
"""Reduction width at which :func:`weight_storage_bits` counts a weight row: per-row metadata (scales, survivor
counts) is spread over this many entries, the order of the widths of the larger sweep models."""


def weight_storage_bits(recipe: Recipe) -> float:
    """Bits per element a block weight of ``recipe`` takes in storage, metadata included
    (``TensorSpec.storage_bits`` at :data:`STORAGE_ROW` entries per row): 16 for bf16, 4 + 32/4096 for a per-row
    scaled int4, about 9 for a 50 % sparse bf16 weight (survivors plus a bitmap). The memory budgets of
    :mod:`bitlaw.scaling.predict` and the report's ρ per bit use it."""
    return recipe.weight.storage_bits(STORAGE_ROW)


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

    def notes(self) -> list[str]:
        """What the form leaves out by design for these recipes (not a defect of the runs): e.g. the parameters of
        a compression type no run has."""
        return []


class Decoupled(Law):
    """One free efficiency ``rho[name]`` per quantized recipe, in [1e-4, 1]; bf16 (no quantized role) is fixed
    to 1."""

    name = "decoupled"
    min_runs_per_recipe = 3

    def __init__(self, recipes: Sequence[Recipe]):
        super().__init__(recipes)
        self.free = [i for i, r in enumerate(self.recipes) if compressed(r)]
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
        if not compressed(recipe):
            return 1.0
        key = f"rho[{recipe.name}]"
        if key not in params:
            fitted = [k[4:-1] for k in params if k.startswith("rho[")]
            raise ValueError(f"decoupled law: recipe {recipe.name!r} was not fitted; allowed: bf16, "
                             f"{', '.join(fitted)} (or use the gmse/factorized/kumar form, which covers any "
                             "recipe)")
        return params[key]

    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        out = []
        if all(compressed(recipe) for recipe in self.recipes):
            out.append("decoupled: no bf16 runs, so every rho[...] trades off against A (ρ is relative to bf16)")
        for i in self.free:
            count = runs_per_recipe[self.names[i]]
            if count < self.min_runs_per_recipe:
                out.append(f"decoupled: rho[{self.names[i]}] rests on {count} run(s); need ≥ "
                           f"{self.min_runs_per_recipe} to be identified beyond the noise")
        return out


class ComponentGMSE(Law):
    """ρ(R) = Π over the components c of R of L_c[g] · tanh(F[g] · log_{1/4} GMSE_c)^C[g], one parameter set per
    *group* g of component types (:meth:`group_of`); each L_c ≤ 1 so that every component's ρ ≤ 1 (module
    docstring). Subclasses say how types are grouped and how the parameters are named."""

    starts_F = (0.2, 0.4, 0.8)
    starts_C = (0.7, 1.4, 2.1)

    def __init__(self, recipes: Sequence[Recipe]):
        super().__init__(recipes)
        self.components = [recipe_components(recipe) for recipe in self.recipes]
        self.groups = self.fitted_groups({c.type for components in self.components for c in components})
        self.extra_names = [name for group in self.groups for name in self.param_names(group)]
        self.bounds = [(1e-3, RHO_MAX), (1e-3, 20.0), (1e-3, 20.0)] * len(self.groups)
        self.capped = [self.param_names(group)[0] for group in self.groups]
        # The same (L_c, F, C) for every group at each start: the runs of each type then pull its set apart.
        self.starts = np.array([[1.0, f, c] * len(self.groups) for f in self.starts_F for c in self.starts_C]
                               ).reshape(len(self.starts_F) * len(self.starts_C), 3 * len(self.groups))
        # Per recipe: (group index, log_{1/4} GMSE) of each component.
        self.terms = [[(self.groups.index(self.group_of(c.type)), component_log_quarter_gmse(c)) for c in components]
                      for components in self.components]

    @staticmethod
    @abstractmethod
    def group_of(component_type: str) -> str:
        """The parameter group of a component type."""

    @staticmethod
    @abstractmethod
    def param_names(group: str) -> tuple[str, str, str]:
        """The names of (L_c, F, C) of ``group``."""

    @staticmethod
    @abstractmethod
    def fitted_groups(types: set[str]) -> list[str]:
        """The groups that get parameters when the recipes have components of ``types``."""

    def log_capacity(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_rho = np.zeros((len(extra), len(self.recipes)))
        jac = np.zeros((len(extra), len(self.recipes), extra.shape[1]))
        for i, terms in enumerate(self.terms):
            for k, g in terms:
                L_c, F, C = extra[:, 3 * k], extra[:, 3 * k + 1], extra[:, 3 * k + 2]
                x = F * g
                log_tanh = np.log(np.tanh(x))
                log_rho[:, i] += np.log(L_c) + C * log_tanh
                jac[:, i, 3 * k] += 1.0 / L_c
                jac[:, i, 3 * k + 1] += 2.0 * C * g / np.sinh(2.0 * x)  # d/dF of C·log tanh(Fg)
                jac[:, i, 3 * k + 2] += log_tanh
        return log_rho, jac

    @classmethod
    def capacity(cls, params: dict[str, float], recipe: Recipe) -> float:
        out = 1.0
        for component in recipe_components(recipe):
            names = cls.param_names(cls.group_of(component.type))
            if not set(names) <= set(params):
                fitted = [t for t in COMPONENT_TYPES if set(cls.param_names(cls.group_of(t))) <= set(params)]
                raise ValueError(f"{cls.name} law: recipe {recipe.name!r} has a {component.type} component "
                                 f"({component.role}), but {', '.join(names)} were not fitted (no run had one); "
                                 "allowed: recipes whose components are all of the fitted types "
                                 f"({', '.join(fitted) or 'none'})")
            L_c, F, C = (params[name] for name in names)
            out *= float(tanh_capacity(component.gmse.value, L_c, F, C))
        return out

    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        # Three parameters need ρ at three GMSE values; w2a2 beside w2 adds no new value (ρ² of the same ρ).
        out = []
        for k, group in enumerate(self.groups):
            distinct = {round(g, 9) for terms in self.terms for j, g in terms if j == k}
            if len(distinct) < 3:
                out.append(f"{self.name}: {', '.join(self.param_names(group))} need components with ≥ 3 distinct "
                           f"GMSE values; got {len(distinct)}, so the tanh curve is not identifiable (add recipes "
                           "with other formats or sparsities)")
        return out


class GMSE(ComponentGMSE):
    """One (L_c, F, C) for every component, whatever its type: the Unified law for a single compression type."""

    name = "gmse"

    @staticmethod
    def group_of(component_type: str) -> str:
        return ""

    @staticmethod
    def param_names(group: str) -> tuple[str, str, str]:
        return "L_c", "F", "C"

    @staticmethod
    def fitted_groups(types: set[str]) -> list[str]:
        return [""]  # fitted even without components: the form always reports its three parameters

    def coverage_warnings(self, runs_per_recipe: dict[str, int]) -> list[str]:
        out = super().coverage_warnings(runs_per_recipe)
        if any(c.type == "sparsity" for components in self.components for c in components):
            out.append("gmse: sparsity components share the one (L_c, F, C) of quantization here; the factorized "
                       "form fits sparsity its own curve")
        return out


class Factorized(ComponentGMSE):
    """A separate ``(L_c[t], F[t], C[t])`` per component type t present in the runs (module docstring)."""

    name = "factorized"

    @staticmethod
    def group_of(component_type: str) -> str:
        return component_type

    @staticmethod
    def param_names(group: str) -> tuple[str, str, str]:
        return f"L_c[{group}]", f"F[{group}]", f"C[{group}]"

    @staticmethod
    def fitted_groups(types: set[str]) -> list[str]:
        return [t for t in COMPONENT_TYPES if t in types]

    def notes(self) -> list[str]:
        return [f"factorized: no run has a {t} component, so {', '.join(self.param_names(t))} are not fitted; "
                f"recipes with {t} cannot be predicted from this fit"
                for t in COMPONENT_TYPES if t not in self.groups]


class Kumar(Law):
    """ρ(R) = Π_x (1 − e^(−P_x/γ_x)), x ∈ {weight, input}; bf16 roles contribute 1. ρ < 1 for any γ > 0, so
    nothing is capped. Sparsity is not part of this form: a sparse recipe gets the ρ of its formats alone."""

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
        sparse = [r.name for r in self.recipes if any(getattr(r, role).sparse for role in ROLES)]
        if sparse:
            out.append(f"kumar: the form counts bits only and does not see the sparsity of {', '.join(sparse)}; "
                       "their losses pull gamma_w and gamma_a (fit the factorized form for sparsity)")
        return out


LAWS: dict[str, type[Law]] = {"decoupled": Decoupled, "gmse": GMSE, "factorized": Factorized, "kumar": Kumar}


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
