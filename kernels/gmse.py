"""The Gaussian MSE (GMSE) of any tensor spec, exact where a closed form exists, else by seeded Monte Carlo.

GMSE is the mean squared error of a representation on i.i.d. N(0, 1) data, relative to the data's energy:
E[(x̂ − x)²] / E[x²] (docs/scaling-laws.md §7). The scaling laws turn it into a capacity, one value per
*component* of a recipe: the quantization of a role, or its sparsity (:func:`recipe_components`).

Exact values (``method="exact"``, ``stderr=0``), all limits of infinitely long rows:

- a dense ``bf16`` spec: 0;
- sparsity alone (format ``bf16``): unstructured magnitude pruning (``row`` or ``tensor``) →
  :func:`kernels.formats.sparsity_gmse`, N:M → :func:`kernels.formats.nm_sparsity_gmse`. ``magnitude`` and
  ``rbbm`` prune by magnitude in the forward; RigL's mask starts as the magnitude top-k and then moves by drop and
  grow, and is given the same GMSE, that of magnitude pruning at its sparsity (how the Unified paper measures
  sparsity). The rule, its band and schedule still tell components apart (:func:`recipe_components`);
- a grid with the ``gaussian_rms`` scale and no scale groups, outliers or sparsity →
  :func:`kernels.formats.gmse` of its format, whatever the gradient rule and the rotation: an orthonormal rotation
  (the block Hadamard) maps i.i.d. N(0, 1) rows to i.i.d. N(0, 1) rows, so it cannot change a Gaussian MSE.

Everything else (``absmax`` and ``lsq`` scales, scale groups, outliers, sparsity combined with quantization) is
measured by :func:`monte_carlo_gmse`: N(0, 1) rows of ``in_features`` values through the project's reference
quantizer :func:`kernels.quantizers.quantize`. There the row length matters: an ``absmax`` scale is the largest
of ``in_features`` values. A ``gaussian_rms`` row divided by its own RMS has lighter tails than N(0, 1), which
lowers its MSE by O(1/in_features): measured −0.3 % (int4) and −0.15 % (int2) at 1024 values per row, −2.7 % and
−1.3 % at 128. That is far below what a loss fit resolves, so the exact infinite-row value is used for those specs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .formats import gmse as format_gmse
from .formats import nm_sparsity_gmse, sparsity_gmse
from .quantizers import initial_lsq_scale, quantize, rotate
from .recipe import Recipe, TensorSpec
from .sparsity import SparseState, magnitude_keep

DEFAULT_IN_FEATURES = 1024  # a multiple of the Hadamard block 128, and the order of the models' widths
DEFAULT_SAMPLES = 4096  # rows: 4M values, standard errors of 0.03–0.3 % of the GMSE for the int4 rules
BATCHES = 32  # batch means for the standard error; also the unit of "tensor"-wide statistics (one batch)
ROLES = ("weight", "input")
COMPONENT_TYPES = ("quantization", "sparsity")
# The TensorSpec fields that describe sparsity and its training rule: reset to get a spec's quantization alone,
# kept (on a bf16 spec) to get its sparsity alone, so that e.g. RBBM with two bands are two sparsity components.
SPARSITY_FIELDS = ("sparsity", "structure", "sparse_rule", "band", "schedule", "ramp", "update_every",
                   "drop_fraction", "rigl_stop")


@dataclass(frozen=True)
class GMSE:
    """A Gaussian MSE: ``value`` = E[(x̂ − x)²] / E[x²] on i.i.d. N(0, 1) data, with its standard error.

    method:      ``exact`` (closed form; ``stderr`` 0, ``samples`` 0, ``in_features`` None: the infinite-row
                 limit) or ``monte-carlo``.
    stderr:      standard error of ``value`` from :data:`BATCHES` batch means (Monte Carlo).
    samples:     rows drawn (Monte Carlo).
    in_features: values per row (Monte Carlo).
    """

    value: float
    stderr: float = 0.0
    method: str = "exact"
    samples: int = 0
    in_features: int | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Component:
    """One compression of one role of a recipe: ``type`` is ``quantization`` or ``sparsity``.

    ``spec`` is the role's spec reduced to this component alone (the dense spec for quantization, a ``bf16``
    spec carrying the sparsity fields for sparsity), so two recipes share a component exactly when their
    ``(role, type, spec)`` are equal; ``gmse`` is :func:`spec_gmse` of that spec.
    """

    role: str
    type: str
    spec: TensorSpec
    gmse: GMSE

    @property
    def key(self) -> tuple[str, str, TensorSpec]:
        """``(role, type, spec)``: what identifies the component across recipes."""
        return self.role, self.type, self.spec


def _defaults(names: tuple[str, ...]) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(TensorSpec) if f.name in names}


def dense_spec(spec: TensorSpec) -> TensorSpec:
    """``spec`` without its sparsity (the sparsity fields back at their defaults): its quantization alone."""
    return dataclasses.replace(spec, **_defaults(SPARSITY_FIELDS))


def sparsity_spec(spec: TensorSpec) -> TensorSpec:
    """A ``bf16`` spec with ``spec``'s sparsity fields and every other field at its default: its sparsity alone."""
    return TensorSpec(format="bf16", **{name: getattr(spec, name) for name in _defaults(SPARSITY_FIELDS)})


def _exact(spec: TensorSpec) -> float | None:
    """The closed-form GMSE of ``spec``, or None when there is none (module docstring)."""
    if not spec.quantized:
        if not spec.sparse:
            return 0.0
        return nm_sparsity_gmse(*spec.nm) if spec.nm else sparsity_gmse(spec.sparsity)
    plain = spec.scale == "gaussian_rms" and spec.group is None and spec.outliers == 0.0 and not spec.sparse
    return format_gmse(spec.format) if plain else None


def _check_sizes(in_features: int, samples: int) -> None:
    for name, value, minimum in (("in_features", in_features, 1), ("samples", samples, BATCHES)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer ≥ {minimum}")
    if samples % BATCHES:
        raise ValueError(f"samples={samples} is not allowed; allowed: a multiple of {BATCHES} (rows are drawn in "
                         f"{BATCHES} equal batches for the standard error)")


def spec_gmse(spec: TensorSpec, in_features: int = DEFAULT_IN_FEATURES, samples: int = DEFAULT_SAMPLES,
              seed: int = 0) -> GMSE:
    """The GMSE of ``spec``: exact where a closed form exists, else :func:`monte_carlo_gmse` with these arguments
    (module docstring). Deterministic for a given ``seed``; cached per argument set.

    Raises ValueError for ``in_features``/``samples`` that :func:`monte_carlo_gmse` refuses (checked on both
    paths, so a valid call does not depend on which one it takes), and, on the Monte Carlo path, when the spec's
    Hadamard block, group or N:M does not divide ``in_features``.
    """
    _check_sizes(in_features, samples)
    return _spec_gmse(spec, in_features, samples, seed)


@functools.cache
def _spec_gmse(spec: TensorSpec, in_features: int, samples: int, seed: int) -> GMSE:
    exact = _exact(spec)
    if exact is not None:
        return GMSE(float(exact))
    return monte_carlo_gmse(spec, in_features, samples, seed)


def monte_carlo_gmse(spec: TensorSpec, in_features: int = DEFAULT_IN_FEATURES, samples: int = DEFAULT_SAMPLES,
                     seed: int = 0) -> GMSE:
    """GMSE of ``spec`` measured on ``samples`` rows of ``in_features`` i.i.d. N(0, 1) values (float64).

    The rows are drawn from ``torch.Generator().manual_seed(seed)`` in :data:`BATCHES` equal batches; each batch
    is one tensor ``[samples / BATCHES, in_features]`` for :func:`kernels.quantizers.quantize` (so a tensor-wide
    statistic, e.g. an LSQ scale, spans one batch). ``value`` = Σ (x̂_h − x_h)² / Σ x_h² over all batches and
    ``stderr`` the standard deviation of the per-batch ratios over √BATCHES.

    The error is measured in the domain ``quantize`` returns its values in: x_h = ``rotate(x, spec)``, the rotated
    input when ``spec.rotated``. The rotation is orthonormal, so ‖x̂_h − x_h‖ = ‖Hᵀx̂_h − x‖: this is the error of
    the representation in the original domain, including whatever ``quantize`` prunes (the comparison is always
    with the unpruned input), without one more transform.

    A learned scale (``lsq``, ``lsq_step``) is taken at the value the quantized layer initialises it to
    (:func:`kernels.quantizers.initial_lsq_scale` of the batch): training moves it, so this is the GMSE at the
    start. For ``lsq`` that is the Gaussian-optimal α of the whole tensor (about the format's GMSE); for
    ``lsq_step`` LSQ's own initial step, which clips much wider (a larger GMSE). Likewise RigL's persistent mask is
    taken as the layer initialises it, the magnitude top-k; a gradual schedule is at its final sparsity.

    Raises ValueError when ``samples`` is not a positive multiple of :data:`BATCHES`, when the Hadamard block,
    group or N:M does not divide ``in_features``, or for a dense ``bf16`` spec (nothing is represented
    differently).
    """
    _check_sizes(in_features, samples)
    spec.check_in_features(in_features, "GMSE rows")
    if not spec.compressed:
        raise ValueError(f"spec format {spec.format!r} without sparsity represents its tensor exactly; its GMSE is 0 "
                         "(spec_gmse), there is nothing to measure")
    generator = torch.Generator().manual_seed(seed)
    rows = samples // BATCHES
    errors, energies = np.empty(BATCHES), np.empty(BATCHES)
    with _one_thread():
        for batch in range(BATCHES):
            errors[batch], energies[batch] = _batch(spec, torch.randn(rows, in_features, generator=generator,
                                                                      dtype=torch.float64))
    ratios = errors / energies
    return GMSE(value=float(errors.sum() / energies.sum()), stderr=float(ratios.std(ddof=1) / math.sqrt(BATCHES)),
                method="monte-carlo", samples=samples, in_features=in_features)


def _batch(spec: TensorSpec, x: torch.Tensor) -> tuple[float, float]:
    """(Σ (x̂_h − x_h)², Σ x_h²) of one batch ``x`` of rows under ``spec`` (see :func:`monte_carlo_gmse`)."""
    reference = rotate(x, spec)
    lsq_scale = initial_lsq_scale(x, spec).reshape(1) if spec.learned_scale else None
    state = None
    if spec.sparse and spec.sparse_rule == "rigl":
        state = SparseState(keep=magnitude_keep(reference, spec.structure, spec.sparsity))
    values = quantize(x, spec, lsq_scale, state).values
    return float((values - reference).square().sum()), float(reference.square().sum())


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread (restored after).

    Why: a batch holds ~10⁵ values, too few for a second thread to pay; on a busy machine waiting for it made a
    Monte Carlo estimate 20× slower. One thread also fixes the order of every sum, whatever the machine's setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def recipe_components(recipe: Recipe, in_features: int = DEFAULT_IN_FEATURES, samples: int = DEFAULT_SAMPLES,
                      seed: int = 0) -> list[Component]:
    """The compressions of ``recipe``, weight role first: per role its sparsity (if any), then its quantization
    (if any), each with :func:`spec_gmse` of the component alone (other arguments as there). A bf16 recipe has
    none; a sparse and quantized weight gives two components, its sparsity alone and its quantization alone."""
    out = []
    for role in ROLES:
        spec = getattr(recipe, role)
        if spec.sparse:
            alone = sparsity_spec(spec)
            out.append(Component(role, "sparsity", alone, spec_gmse(alone, in_features, samples, seed)))
        if spec.quantized:
            alone = dense_spec(spec)
            out.append(Component(role, "quantization", alone, spec_gmse(alone, in_features, samples, seed)))
    return out
