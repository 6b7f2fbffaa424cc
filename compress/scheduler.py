"""Layer-wise sparsity allocation: the loss-clustering scheduler of Zhang et al. 2024 and two baselines, uniform and
OWL (docs/compress.md §3).

Every function returns ``{layer name: sparsity}`` whose parameter-weighted mean ``Σ s_l · n_l / Σ n_l`` (``n_l``
the layer's weight count) equals the target: the model ends at the asked size, only its distribution changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels.sparsity import descending_rank, kept_count
from .obs import damped

# Bisection steps for the shift of the scheduler: the interval (a few units wide) halves each time, far below 1e-12.
_BISECTIONS = 200


def layer_pruning_loss(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, damp: float = 0.01) -> float:
    """The OBS estimate of the loss of pruning ``weight`` ``[out, in]`` to ``sparsity``, in the units of
    :class:`~bitlaw.compress.obs.LayerResult`'s ``loss`` (``H = 2XᵀX/N``).

    Each entry's cost is ``w² / (2 [H_d⁻¹]_jj)`` (``H_d`` the dampened Hessian ``[in, in]``, dead inputs as in
    :func:`~bitlaw.compress.obs.compress_layer`, whose weights cost 0); in every row the ``⌊s·in + ½⌋`` cheapest
    entries are summed, as if each were pruned on its own with the others left to compensate (the paper's
    "sequentially prune all" estimate). Raises ValueError for shapes that do not fit or a sparsity outside [0, 1).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not fit; allowed: "
                         "weight [out, in] and hessian [in, in]")
    if not (isinstance(sparsity, int | float) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity={sparsity!r} is not allowed; allowed: a fraction in [0, 1)")
    h, dead = damped(hessian.detach().to(weight.device), damp)
    inverse_diagonal = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()
    w = weight.detach().to(torch.float64)
    cost = torch.where(dead, 0.0, w.square() / (2 * inverse_diagonal))
    pruned = weight.shape[1] - kept_count(weight.shape[1], sparsity) if sparsity else 0
    return float(torch.where(descending_rank(-cost) < pruned, cost, 0.0).sum())


def kmeans_1d(values: Sequence[float], k: int) -> list[int]:
    """Lloyd's K-means on numbers: labels ``0 … k'−1`` (``k' <= k``, clusters that end empty dropped) ordered by
    cluster centre, ascending. Deterministic: centres start at the ``(i + ½)/k`` quantiles of the sorted values,
    each value goes to its nearest centre (ties to the lower), centres move to their means, until no label changes.
    """
    data = [float(v) for v in values]
    if not data or not all(math.isfinite(v) for v in data):
        raise ValueError(f"values={values!r} are not allowed; allowed: a non-empty sequence of finite numbers")
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(data)):
        raise ValueError(f"k={k!r} is not allowed; allowed: an integer in [1, {len(data)}] (the number of values)")
    ordered = sorted(data)
    centres = [ordered[min(int((i + 0.5) / k * len(data)), len(data) - 1)] for i in range(k)]
    labels: list[int] = []
    # Lloyd's iteration never raises the within-cluster sum of squares and there are finitely many labellings, so it
    # settles; the bound only guards against rounding making two labellings alternate.
    for _ in range(100 * len(data)):
        new = [min(range(k), key=lambda c, v=v: (abs(v - centres[c]), c)) for v in data]
        if new == labels:
            break
        labels = new
        for c in range(k):
            members = [v for v, label in zip(data, labels, strict=True) if label == c]
            if members:
                centres[c] = sum(members) / len(members)
    used = sorted(set(labels), key=lambda c: centres[c])
    rank = {c: i for i, c in enumerate(used)}
    return [rank[label] for label in labels]


def _check_sizes(sizes: dict[str, int]) -> None:
    if not sizes:
        raise ValueError("sizes is empty; allowed: {layer name: weight count} with at least one layer")
    bad = {name: n for name, n in sizes.items() if not (isinstance(n, int) and not isinstance(n, bool) and n > 0)}
    if bad:
        raise ValueError(f"sizes {bad} are not allowed; allowed: positive integers (weights per layer)")


def _check_target(target: float) -> None:
    if not (isinstance(target, int | float) and not isinstance(target, bool) and 0 <= target < 1):
        raise ValueError(f"target={target!r} is not allowed; allowed: a fraction in [0, 1)")


def weighted_mean(sparsities: dict[str, float], sizes: dict[str, int]) -> float:
    """``Σ s_l · n_l / Σ n_l`` over the layers of ``sizes``."""
    return sum(sparsities[name] * n for name, n in sizes.items()) / sum(sizes.values())


def uniform(sizes: dict[str, int], target: float) -> dict[str, float]:
    """Every layer at ``target`` in [0, 1)."""
    _check_sizes(sizes)
    _check_target(target)
    return {name: float(target) for name in sizes}


def schedule(losses: dict[str, float], sizes: dict[str, int], target: float, clusters: int = 3,
             spread: float = 0.1, max_sparsity: float = 0.95) -> dict[str, float]:
    """Zhang et al. 2024's allocation: layers whose estimated pruning loss (:func:`layer_pruning_loss` at
    ``target``) is low get more sparsity.

    The log-losses are clustered by :func:`kmeans_1d` into at most ``clusters`` groups; ranked by centre, the
    lowest-loss cluster starts at ``target + spread``, the highest at ``target − spread``, the others linearly in
    between (one cluster: ``target``). One shift ``δ`` common to all layers, each result clipped to
    ``[0, max_sparsity]``, then makes the parameter-weighted mean exactly ``target`` (the clipped mean is continuous
    and non-decreasing in ``δ``; bisection). Sparsities are non-increasing in the cluster's loss.

    losses: ``{name: loss >= 0}`` (0 counts as the smallest positive float); sizes: ``{name: weights}``, the same
    names. Raises ValueError for a target outside ``[0, max_sparsity]`` (unreachable by clipped sparsities) and for
    other bad arguments.
    """
    if not (isinstance(max_sparsity, int | float) and 0 < max_sparsity < 1):
        raise ValueError(f"max_sparsity={max_sparsity!r} is not allowed; allowed: a fraction in (0, 1)")
    if not (isinstance(target, int | float) and 0 <= target <= max_sparsity):
        raise ValueError(f"target={target!r} cannot be reached with every layer in [0, max_sparsity="
                         f"{max_sparsity:g}]; allowed: a target in [0, {max_sparsity:g}] (or raise max_sparsity)")
    _check_sizes(sizes)
    if set(losses) != set(sizes):
        raise ValueError(f"losses and sizes name different layers: only in losses {sorted(set(losses) - set(sizes))}"
                         f", only in sizes {sorted(set(sizes) - set(losses))}")
    bad = {name: v for name, v in losses.items() if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"losses {bad} are not allowed; allowed: finite numbers >= 0")
    if not (isinstance(clusters, int) and not isinstance(clusters, bool) and clusters >= 1):
        raise ValueError(f"clusters={clusters!r} is not allowed; allowed: a positive integer (K of the K-means)")
    if not (isinstance(spread, int | float) and math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread={spread!r} is not allowed; allowed: a finite number >= 0")

    names = list(sizes)
    logs = [math.log(max(float(losses[name]), math.ulp(0.0))) for name in names]
    labels = kmeans_1d(logs, min(clusters, len(names)))
    count = max(labels) + 1
    start = {name: target + spread - (2 * spread * label / (count - 1) if count > 1 else 0.0)
             for name, label in zip(names, labels, strict=True)}

    def shifted(delta: float) -> dict[str, float]:
        return {name: min(max(s + delta, 0.0), max_sparsity) for name, s in start.items()}

    # At δ = low every layer clips to 0, at δ = high to max_sparsity: the target lies in between.
    low, high = -1.0 - 2 * spread, 1.0 + 2 * spread
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if weighted_mean(shifted(middle), sizes) < target:
            low = middle
        else:
            high = middle
    return shifted((low + high) / 2)


def outlier_ratio(weight: torch.Tensor, hessian: torch.Tensor, threshold: float = 5.0) -> float:
    """OWL's layer outlier ratio: the fraction of entries whose Wanda score ``|W_ij| · ‖X_j‖`` exceeds ``threshold``
    (OWL's M) times the layer's mean score. ``‖X_j‖ ∝ sqrt(H_jj)`` for ``H = 2XᵀX/N``, and the ratio does not
    depend on the factor. weight ``[out, in]``, hessian ``[in, in]``."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not fit; allowed: "
                         "weight [out, in] and hessian [in, in]")
    score = weight.detach().to(torch.float64).abs() * hessian.detach().to(weight.device).diagonal().to(
        torch.float64).clamp_min(0).sqrt()
    return float((score > threshold * score.mean()).double().mean())


def owl(outlier_ratios: dict[str, float], sizes: dict[str, int], target: float, lam: float = 0.08
        ) -> dict[str, float]:
    """OWL (Yin et al. 2024): layers with more outliers keep more weights.

    The ratios are normalised to ``r_l ∈ [−1, 1]`` (min to −1, max to +1; all equal: 0) and
    ``s_l = target − lam · (r_l − r̄)`` with ``r̄`` their parameter-weighted mean, so the weighted mean is ``target``
    and the layers span at most ``2·lam``. Raises ValueError when a layer would leave [0, 1) (lower ``lam``).
    """
    _check_sizes(sizes)
    _check_target(target)
    if set(outlier_ratios) != set(sizes):
        raise ValueError(f"outlier_ratios and sizes name different layers: "
                         f"{sorted(set(outlier_ratios) ^ set(sizes))}")
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam={lam!r} is not allowed; allowed: a finite number >= 0 (OWL's λ, 0.08)")
    low, high = min(outlier_ratios.values()), max(outlier_ratios.values())
    normalised = {name: (2 * (r - low) / (high - low) - 1 if high > low else 0.0)
                  for name, r in outlier_ratios.items()}
    centre = weighted_mean(normalised, sizes)
    result = {name: target - lam * (normalised[name] - centre) for name in sizes}
    outside = {name: s for name, s in result.items() if not 0 <= s < 1}
    if outside:
        raise ValueError(f"owl: target={target:g} with lam={lam:g} puts layers outside [0, 1): {outside}; allowed: "
                         "a smaller lam or a target further from 0 and 1")
    return result
