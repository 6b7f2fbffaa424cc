"""Predictions from a fitted law: the loss of one run, and the best recipe at a fixed memory or compute budget.

Budgets (per recipe R, with bits_w / bits_a its weight / input format bits, 16 for a bf16 role, and S_w the bits
a block weight takes in storage, metadata and sparsity included: ``laws.weight_storage_bits``):

- memory: the block weights fill ``memory_bytes``, so N = 8 · memory_bytes / S_w; D is given.
- compute: training costs 6 · N · D FLOPs, each worth P/16 of a bf16 FLOP with P = max(bits_w, bits_a) (the
  ``bits`` cost model: a matmul runs at the width of its wider operand, on hardware whose rate grows as the width
  shrinks; weight-only recipes gain nothing) or 1 (the ``flat`` model: every recipe runs at the bf16 rate, so
  only ρ > 1 could beat bf16). N follows from the budget and either a fixed D or a fixed ratio D/N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..kernels.recipe import Recipe
from .laws import capacity, predict_loss, recipe_bits, weight_storage_bits

COST_MODELS = ("bits", "flat")


@dataclass(frozen=True)
class Candidate:
    """One recipe placed at the budget: its format bits, weight storage bits ``storage_w`` (per element), size
    ``N``, tokens ``D``, capacity ``rho`` and predicted ``loss``."""

    name: str
    bits_w: int
    bits_a: int
    storage_w: float
    N: float
    D: float
    rho: float
    loss: float


def matmul_bits(recipe: Recipe) -> int:
    """The width a layer's matmul runs at: the wider of its two operands (16 for bf16)."""
    return max(recipe_bits(recipe))


def budget_point(recipe: Recipe, *, memory_bytes: float | None = None, compute_flops: float | None = None,
                 D: float | None = None, ratio: float | None = None, cost: str = "bits") -> tuple[float, float]:
    """(N, D) of ``recipe`` at a budget: exactly one of ``memory_bytes`` (needs ``D``) or ``compute_flops`` (needs
    exactly one of ``D`` or ``ratio`` = D/N); ``cost`` is ``bits`` or ``flat`` (module docstring)."""
    if (memory_bytes is None) == (compute_flops is None):
        raise ValueError("give exactly one budget: memory_bytes or compute_flops")
    if cost not in COST_MODELS:
        raise ValueError(f"cost model {cost!r} is not allowed; allowed: {', '.join(COST_MODELS)}")
    if memory_bytes is not None:
        if D is None or ratio is not None:
            raise ValueError("a memory budget needs D (training tokens) and no ratio")
        return 8.0 * memory_bytes / weight_storage_bits(recipe), D
    if (D is None) == (ratio is None):
        raise ValueError("a compute budget needs exactly one of D (training tokens) or ratio (D/N)")
    bf16_flops = compute_flops * (16.0 / matmul_bits(recipe) if cost == "bits" else 1.0)
    if D is not None:
        return bf16_flops / (6.0 * D), D
    N = math.sqrt(bf16_flops / (6.0 * ratio))
    return N, ratio * N


def rank_recipes(form: str, params: dict[str, float], recipes: dict[str, Recipe], **budget: float | str | None
                 ) -> list[Candidate]:
    """Every recipe of ``recipes`` (name → Recipe) at the budget (keywords of :func:`budget_point`), best
    (lowest predicted loss) first; ties keep the given order."""
    out = []
    for name, recipe in recipes.items():
        N, D = budget_point(recipe, **budget)
        out.append(Candidate(name, *recipe_bits(recipe), weight_storage_bits(recipe), N=N, D=D,
                             rho=capacity(form, params, recipe), loss=predict_loss(form, params, recipe, N, D)))
    return sorted(out, key=lambda candidate: candidate.loss)
