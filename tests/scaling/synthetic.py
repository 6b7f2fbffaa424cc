"""Synthetic run tables from known law parameters, written independently of :mod:`scaling.laws`.

The capacities here restate docs/scaling-laws.md §3–5, §8 directly (GMSE from the table of docs/numerics.md §2
and the closed form of magnitude pruning, the tanh form, factorization over components, the Kumar product), so a
wrong law in ``scaling/`` cannot agree with them by construction.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe
from bitlaw.scaling.runs import Run

# docs/numerics.md §2
GMSE_TABLE = {"int1": 0.3633802276, "int2": 0.1188460504, "int3": 0.0374396594, "int4": 0.0115428845}
BITS = {"int1": 1, "int2": 2, "int3": 3, "int4": 4}
# (weight format, input format) of the presets used here; None: bf16.
ROLES = {"bf16": (None, None), "quest_w4a4": ("int4", "int4"), "quest_w3a3": ("int3", "int3"),
         "quest_w2a2": ("int2", "int2"), "quest_w1a1": ("int1", "int1"), "quest_w2": ("int2", None),
         "quest_w4": ("int4", None)}
# Sparse recipes built here (no preset): (weight format, input format, weight sparsity); None: bf16.
SPARSE = {"sparse30": (None, None, 0.3), "sparse50": (None, None, 0.5), "sparse75": (None, None, 0.75),
          "sparse90": (None, None, 0.9), "sparse50_w4a4": ("int4", "int4", 0.5),
          "sparse75_w2a2": ("int2", "int2", 0.75), "sparse50_w4": ("int4", None, 0.5),
          "sparse75_w4a4": ("int4", "int4", 0.75)}
SHARED = {"A": 300.0, "alpha": 0.32, "B": 900.0, "beta": 0.33, "E": 1.8}
EXTRA = {"decoupled": {"rho[quest_w4a4]": 0.78, "rho[quest_w2a2]": 0.42, "rho[quest_w1a1]": 0.12,
                       "rho[quest_w2]": 0.66},
         "gmse": {"L_c": 1.0, "F": 0.41, "C": 1.39},
         "factorized": {"L_c[quantization]": 1.0, "F[quantization]": 0.41, "C[quantization]": 1.39,
                        "L_c[sparsity]": 0.9, "F[sparsity]": 0.6, "C[sparsity]": 1.2},
         "kumar": {"gamma_w": 1.8, "gamma_a": 1.1}}
RECIPES = ("bf16", "quest_w4a4", "quest_w2a2", "quest_w1a1", "quest_w2")
SIZES = tuple(np.geomspace(2e6, 2e8, 5))
RATIOS = (10.0, 40.0, 160.0)


def sparsity_gmse(sparsity: float) -> float:
    """MSE of zeroing the smallest-|x| fraction ``sparsity`` of N(0, 1): s − 2tφ(t), t = Φ⁻¹((1 + s)/2)."""
    t = NormalDist().inv_cdf((1.0 + sparsity) / 2.0)
    return sparsity - 2.0 * t * NormalDist().pdf(t)


def make_recipe(name: str) -> Recipe:
    """A preset of conf/quant, or one of the sparse recipes of :data:`SPARSE`."""
    if name not in SPARSE:
        return load_recipe(name)
    weight, inputs, sparsity = SPARSE[name]
    return Recipe(name=name, weight=TensorSpec(format=weight or "bf16", sparsity=sparsity),
                  input=TensorSpec(format=inputs or "bf16"))


def components(name: str) -> list[tuple[str, float]]:
    """(type, GMSE) of each compression of a recipe: its weight sparsity, then the quantized formats."""
    weight, inputs, sparsity = SPARSE[name] if name in SPARSE else (*ROLES[name], 0.0)
    out = [("sparsity", sparsity_gmse(sparsity))] if sparsity else []
    return out + [("quantization", GMSE_TABLE[f]) for f in (weight, inputs) if f is not None]


def true_capacity(form: str, params: dict[str, float], recipe: str) -> float:
    """ρ of a recipe under ``form`` with ``params``, from the formulas of docs/scaling-laws.md §3–5, §8."""
    if form == "decoupled":
        return params[f"rho[{recipe}]"] if components(recipe) else 1.0
    if form in ("gmse", "factorized"):
        def tanh(kind: str, value: float) -> float:
            L_c, F, C = (params[name if form == "gmse" else f"{name}[{kind}]"] for name in ("L_c", "F", "C"))
            return L_c * math.tanh(F * -math.log(value) / math.log(4.0)) ** C
        return math.prod(tanh(kind, value) for kind, value in components(recipe))
    formats = SPARSE[recipe][:2] if recipe in SPARSE else ROLES[recipe]
    gammas = (params["gamma_w"], params["gamma_a"])
    return math.prod(1.0 - math.exp(-BITS[f] / gammas[i]) for i, f in enumerate(formats) if f is not None)


def true_loss(form: str, params: dict[str, float], recipe: str, N: float, D: float) -> float:
    rho = true_capacity(form, params, recipe)
    return params["A"] / (N * rho) ** params["alpha"] + params["B"] / D ** params["beta"] + params["E"]


def make_runs(form: str, params: dict[str, float] | None = None, recipes=RECIPES, sizes=SIZES, ratios=RATIOS,
              noise: float = 0.003, seed: int = 0) -> list[Run]:
    """One run per (recipe, size, ratio): the law's loss times exp(N(0, noise)) (noise on the log loss)."""
    params = params or {**SHARED, **EXTRA[form]}
    rng = np.random.default_rng(seed)
    return [Run(N=float(N), D=float(N * ratio),
                loss=float(true_loss(form, params, name, N, N * ratio) * math.exp(noise * rng.standard_normal())),
                recipe=make_recipe(name), source=f"synthetic:{name}:{N:.3g}:{ratio:g}")
            for name in recipes for N in sizes for ratio in ratios]


def write_csv(runs: list[Run], path) -> None:
    """The runs as the CSV that ``bitlaw-fit`` reads (N, D, loss, recipe)."""
    lines = ["N,D,loss,recipe"] + [f"{r.N!r},{r.D!r},{r.loss!r},{r.recipe.name}" for r in runs]
    path.write_text("\n".join(lines) + "\n")
