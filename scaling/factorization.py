"""Factorization error: how far a composite recipe's fitted capacity is from the product of its parts' capacities.

The Unified Scaling Laws paper (docs/scaling-laws.md §8) tests factorization on per-recipe (decoupled) fits: for a
composite representation whose parts were each trained alone, compare ρ(composite) with Π ρ(part). Here a
recipe's parts are identified by its components (:func:`kernels.gmse.recipe_components`): recipe P is a part of
recipe R when P's component set is a proper subset of R's, and a *factorization* of R is a set of other recipes
of the table whose component sets are disjoint and together make R's exactly. Examples: ``sparse50_w4a4`` =
``sparse50_magnitude`` × ``quest_w4a4``, and also ``sparse50_magnitude`` × ``quest_w4`` × an input-only int4
recipe when the table has those; ``quest_w4a4`` = ``quest_w4`` × the input-only recipe. Components match exactly
(role, type and every field of the component's spec), so ``ste_w4a4`` is no product of ``quest_w4`` and a trust-
gradient input recipe; a recipe's layout other than ``rotate_back`` counts as one more element.

The relative error of a factorization is Π ρ(part) / ρ(composite) − 1 (positive when the product overestimates
the composite), computed at the fitted values and for every bootstrap resample (its 1σ interval and σ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..kernels.gmse import recipe_components
from ..kernels.recipe import Recipe


def _exact_covers(target: frozenset, blocks: dict[str, frozenset]) -> list[tuple[str, ...]]:
    """Every set of names in ``blocks`` whose sets are disjoint and unite to ``target``."""
    if not target:
        return [()]
    # Exactly one block of a cover holds the target's first element: branching on it finds each cover once.
    first = min(target, key=repr)
    covers = []
    for name, block in blocks.items():
        if first in block and block <= target:
            rest = {other: b for other, b in blocks.items() if other != name}
            covers += [(name, *cover) for cover in _exact_covers(target - block, rest)]
    return covers


def _elements(recipe: Recipe) -> frozenset:
    """What a recipe is made of: its component keys, plus its layout when that is not the default (a weight-only
    ``layout='rotated'`` recipe trains another parametrisation, so it is no part of a recipe that rotates back)."""
    keys = {c.key for c in recipe_components(recipe)}
    if recipe.layout != "rotate_back":
        keys.add(("layout", recipe.layout))
    return frozenset(keys)


def factorizations(recipes: dict[str, Recipe]) -> list[tuple[str, tuple[str, ...]]]:
    """``(composite, parts)`` for every recipe of ``recipes`` (name → Recipe) that is a product of two or more
    other recipes of it (module docstring); composites in table order, their factorizations fewest parts first."""
    components = {name: _elements(recipe) for name, recipe in recipes.items()}
    order = list(recipes).index
    out = []
    for name, own in components.items():
        parts = {other: theirs for other, theirs in components.items() if theirs and theirs < own}
        covers = [tuple(sorted(cover, key=order)) for cover in _exact_covers(own, parts)]
        out += [(name, cover) for cover in sorted(covers, key=lambda c: (len(c), [order(n) for n in c]))
                if len(cover) >= 2]
    return out


def factorization_errors(recipes: dict[str, Recipe], capacity: Callable[[dict[str, float], Recipe], float],
                         params: dict[str, float], resamples: Sequence[dict[str, float]]) -> list[dict[str, Any]]:
    """One row per factorization of :func:`factorizations`: ``composite``, ``parts``, ``rho`` (fitted ρ of the
    composite), ``rho_product`` (Π of its parts' ρ), ``relative_error`` (rho_product / rho − 1), and, from the
    bootstrap ``resamples`` (public parameters each; may be empty), ``interval`` (15.9th–84.1st percentile of the
    error) and ``sigma`` (its standard deviation); both absent without resamples.

    ``capacity(params, recipe)`` is the law's ρ (the decoupled form's: one free ρ per recipe)."""
    def error(values: dict[str, float], composite: str, parts: Sequence[str]) -> tuple[float, float, float]:
        rho = capacity(values, recipes[composite])
        product = float(np.prod([capacity(values, recipes[part]) for part in parts]))
        return rho, product, product / rho - 1.0

    rows = []
    for composite, parts in factorizations(recipes):
        rho, product, relative = error(params, composite, parts)
        row: dict[str, Any] = {"composite": composite, "parts": list(parts), "rho": rho, "rho_product": product,
                               "relative_error": relative}
        if resamples:
            errors = np.array([error(values, composite, parts)[2] for values in resamples])
            row["interval"] = [float(v) for v in np.percentile(errors, [15.865, 84.135])]
            row["sigma"] = float(errors.std(ddof=1)) if len(errors) > 1 else 0.0
        rows.append(row)
    return rows
