"""Sparsity and outliers for the reference quantizer: which entries of a tensor survive, where the sparsity rule
lets the gradient through, the gradual-pruning schedule, and RigL's drop/grow of a persistent mask.

Plain PyTorch, no autograd (the masks are used by :mod:`bitlaw.kernels.quantizers`); docs/numerics.md §7.

A tensor ``x_h`` ``[..., K]`` (the stored domain: rotated when the spec rotates) is split into *units*, in each of
which a fixed number of entries survives: a row (``structure="row"``: per output channel of a weight, per token
of an input), the whole tensor (``"tensor"``), or each group of ``M`` consecutive entries of a row (``"N:M"``).

- Order: entries of a unit are ranked by ``(|x_h| descending, index ascending)``: of equal magnitudes the one at
  the lower index (row-major position within the unit) ranks first, so the number of survivors is exact whatever
  the ties (:func:`descending_rank`).
- Counts: a unit of ``n`` entries at sparsity ``s`` prunes ``⌊s·n + ½⌋`` entries, computed in double precision,
  but at most ``n − 1``: one entry always survives (:func:`kept_count`). N:M keeps exactly ``N`` per group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .recipe import TensorSpec

STRUCTURES = ("row", "tensor")  # besides N:M strings such as "2:4"
SPARSE_RULES = ("magnitude", "rbbm", "rigl")
SCHEDULES = ("constant", "cubic")
_NM = re.compile(r"(\d+):(\d+)")


def parse_nm(structure: str) -> tuple[int, int] | None:
    """``(N, M)`` of an N:M structure such as ``"2:4"`` (digits only; not validated here); None otherwise."""
    match = _NM.fullmatch(structure) if isinstance(structure, str) else None
    return (int(match[1]), int(match[2])) if match else None


def kept_count(n: int, sparsity: float | torch.Tensor) -> int | torch.Tensor:
    """Entries that survive in a unit of ``n`` at ``sparsity``: ``n − min(⌊s·n + ½⌋, n − 1)``.

    A Python float gives an int; a tensor (a scheduled sparsity) gives a float64 tensor of the same shape.
    """
    if isinstance(sparsity, torch.Tensor):
        return n - torch.floor(sparsity.double() * n + 0.5).clamp(max=n - 1)
    return n - min(math.floor(sparsity * n + 0.5), n - 1)


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank (int64, 0 first) of every entry of ``score`` along the last dimension in the order (score descending,
    index ascending). ``rank < k`` selects exactly ``k`` entries per unit, ties going to the lower index."""
    # A stable descending sort keeps equal scores in index order.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def units(t: torch.Tensor, structure: str) -> torch.Tensor:
    """``t`` ``[..., K]`` viewed as ``[..., unit]``: rows as they are, the whole tensor as one unit ``[1, numel]``,
    or ``[..., K/M, M]`` for N:M. ``.reshape(t.shape)`` undoes it."""
    if structure == "tensor":
        return t.reshape(1, -1)
    nm = parse_nm(structure)
    return t.unflatten(-1, (t.shape[-1] // nm[1], nm[1])) if nm else t


def magnitude_keep(x_h: torch.Tensor, structure: str, sparsity: float | torch.Tensor) -> torch.Tensor:
    """Bool, shape of ``x_h``: True for the entries that survive magnitude pruning (top-k of ``|x_h|`` per unit,
    ties to the lower index). ``sparsity`` is ignored for N:M, which keeps N of every M."""
    magnitude = units(x_h.detach().abs(), structure)
    nm = parse_nm(structure)
    kept = nm[0] if nm else kept_count(magnitude.shape[-1], sparsity)
    return (descending_rank(magnitude) < kept).reshape(x_h.shape)


def band_mask(x_h: torch.Tensor, keep: torch.Tensor, structure: str, band: float) -> torch.Tensor:
    """RBBM's backward mask (docs/numerics.md §7), bool, shape of ``x_h``, for ``structure`` row or tensor.

    Per unit: ``T_k`` = the smallest surviving magnitude, ``T_p = RMS(x_h) · Φ⁻¹(½ + band)``, ``m = min``,
    ``M = max``; the gradient flows where ``|x_h| < m``, or where the entry survives and ``|x_h| ≥ M`` (``≥`` on
    the survivors so that the survivor at ``T_k`` itself learns: ``band = 0`` gives ``T_p = 0`` and exactly
    ``keep``, magnitude pruning's mask).
    """
    magnitude = units(x_h.detach().abs(), structure)
    kept = units(keep, structure)
    t_k = torch.where(kept, magnitude, math.inf).amin(dim=-1, keepdim=True)
    t_p = magnitude.square().mean(dim=-1, keepdim=True).sqrt() * NormalDist().inv_cdf(0.5 + band)
    low, high = torch.minimum(t_p, t_k), torch.maximum(t_p, t_k)
    return ((magnitude < low) | (kept & (magnitude >= high))).reshape(x_h.shape)


def outlier_mask(x_h: torch.Tensor, fraction: float, keep: torch.Tensor | None) -> torch.Tensor:
    """Bool, shape of ``x_h``: the ``⌊fraction·K + ½⌋`` largest ``|x_h|`` of each row among its survivors (``keep``;
    None: every entry), ties to the lower index."""
    count = math.floor(fraction * x_h.shape[-1] + 0.5)
    score = x_h.detach().abs()
    if keep is not None:
        score = torch.where(keep, score, -1.0)  # below every magnitude: a pruned entry is never an outlier
    outliers = descending_rank(score) < count
    return outliers if keep is None else outliers & keep


@dataclass
class SparseState:
    """What the sparsity of one weight needs beyond its spec, per call (held by the layer, not the recipe).

    sparsity:  the fraction to prune now (a float64 0-dim tensor from :func:`scheduled_sparsity`); None: the
               spec's own ``sparsity`` (the final one).
    keep:      RigL's persistent mask (bool, the weight's shape): the survivors, and where the gradient flows.
    grad_sink: a dict that receives ``"dense_grad"``, the gradient of the quantized values before any mask, summed
               over backward calls (RigL's grow criterion); None: not captured.
    """

    sparsity: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    grad_sink: dict | None = None


@dataclass
class Selection:
    """Which entries of ``x_h`` are what (bool tensors of its shape; None when the spec has none of it).

    keep:    survivors (all others are exactly 0); grad: where the sparsity rule lets the gradient through;
    outlier: survivors kept in bf16 instead of being rounded to the grid.
    """

    keep: torch.Tensor | None
    grad: torch.Tensor | None
    outlier: torch.Tensor | None

    @property
    def on_grid(self) -> torch.Tensor | None:
        """The entries rounded to the grid, whose values set the scale (survivors that are not outliers)."""
        if self.outlier is None:
            return self.keep
        return ~self.outlier if self.keep is None else self.keep & ~self.outlier


def select(x_h: torch.Tensor, spec: TensorSpec, state: SparseState | None = None) -> Selection:
    """The :class:`Selection` of ``x_h`` ``[..., K]`` (stored domain) under ``spec``'s sparsity and outliers.

    ``magnitude``/``rbbm`` recompute the top-k at every call, at ``state.sparsity`` when given; ``rigl`` uses
    ``state.keep`` and raises ValueError without it.
    """
    state = state or SparseState()
    keep = grad = None
    if spec.sparse:
        if spec.sparse_rule == "rigl":
            if state.keep is None:
                raise ValueError("sparse_rule='rigl' needs the layer's persistent mask (SparseState.keep); "
                                 "a QuantLinear holds it as its rigl_mask buffer")
            keep = grad = state.keep
        else:
            sparsity = spec.sparsity if state.sparsity is None else state.sparsity
            keep = magnitude_keep(x_h, spec.structure, sparsity)
            grad = band_mask(x_h, keep, spec.structure, spec.band) if spec.sparse_rule == "rbbm" else keep
    outlier = outlier_mask(x_h, spec.outliers, keep) if spec.outliers else None
    return Selection(keep, grad, outlier)


def scheduled_sparsity(spec: TensorSpec, progress: torch.Tensor) -> torch.Tensor | None:
    """The fraction to prune at ``progress`` (int64 ``[2]``: the 0-based step and the total steps; a negative step
    means outside training, where the final sparsity applies), as a float64 0-dim tensor; None for
    ``schedule="constant"`` (the spec's sparsity).

    ``cubic`` (Zhu & Gupta 2017): ``s_t = s·(1 − (1 − t/T_ramp)³)`` for ``t < T_ramp = ramp · total``, else ``s``.
    A tensor, not a Python number, so that a compiled forward does not specialise on the step.
    """
    if spec.schedule == "constant":
        return None
    step, total = progress.double().unbind()
    fraction = torch.where(step < 0, 1.0, (step / (spec.ramp * total)).clamp(0.0, 1.0))
    return spec.sparsity * (1 - (1 - fraction) ** 3)


def rigl_due(spec: TensorSpec, step: int, total_steps: int) -> bool:
    """True when RigL updates the mask after ``step`` (0-based): every ``update_every`` steps before
    ``rigl_stop · total_steps``."""
    return step % spec.update_every == 0 and step < spec.rigl_stop * total_steps


def rigl_drop_fraction(spec: TensorSpec, step: int, total_steps: int) -> float:
    """RigL's cosine-decayed drop fraction at ``step``: ``drop_fraction/2 · (1 + cos(π · t / T_end))`` with
    ``T_end = rigl_stop · total_steps``."""
    return spec.drop_fraction / 2 * (1 + math.cos(math.pi * step / (spec.rigl_stop * total_steps)))


def rigl_update(mask: torch.Tensor, magnitude: torch.Tensor, dense_grad: torch.Tensor, fraction: float,
                structure: str) -> torch.Tensor:
    """One RigL step (Evci et al. 2020) on a bool ``mask`` of the weight's shape; returns the new mask.

    Per unit with ``a`` active entries, ``d = ⌊fraction · a + ½⌋``: drop the ``d`` active entries of smallest
    ``|magnitude|``, then grow the ``d`` entries of largest ``|dense_grad|`` among those not kept (just-dropped
    entries included, as in the authors' code), ties to the lower index. The active count is unchanged.
    """
    active = units(mask, structure)
    size = active.sum(dim=-1, keepdim=True)
    drop = torch.floor(fraction * size.double() + 0.5)
    survivors = descending_rank(torch.where(active, units(magnitude.abs(), structure), -1.0)) < size - drop
    grow = descending_rank(torch.where(survivors, -1.0, units(dense_grad.abs(), structure))) < drop
    return (survivors | grow).reshape(mask.shape)


def shrink_mask(mask: torch.Tensor, magnitude: torch.Tensor, sparsity: float, structure: str) -> torch.Tensor:
    """``mask`` with its smallest-``|magnitude|`` active entries dropped until each unit keeps at most
    :func:`kept_count` at ``sparsity`` (a gradual schedule applied to a persistent mask; never grows)."""
    active = units(mask, structure)
    kept = kept_count(active.shape[-1], sparsity)
    rank = descending_rank(torch.where(active, units(magnitude.abs(), structure), -1.0))
    return ((rank < kept) & active).reshape(mask.shape)
