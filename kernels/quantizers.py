"""Reference quantizers in plain PyTorch: QuEST and its baselines, the oracle for every fused kernel.

Rows run along the last (reduction) dimension: a weight ``[out, in]`` has one row per output channel, an
activation ``[..., in]`` one row per token. For a :class:`~kernels.recipe.TensorSpec` ``spec``:

1. rotate: ``x_h = x · blockdiag(H)`` if ``spec.rotated`` (fp32, or float64 for float64 input);
2. scale: a per-row scale ``s`` multiplying the format's unit grid (``gaussian_rms``: ``c · RMS(x_h)``,
   ``absmax``: ``max|x_h| / max_level``, ``lsq``/``lsq_step``: from one learned scalar, :func:`row_scale`);
3. round to the nearest grid level (for ``int{b}``: the centred floor formula of docs/numerics.md §3; for
   ``int{b}z``/``int{b}s``: ``q = clamp(round(x_h / step), qmin, qmax)``, docs/numerics.md §6.1);
4. mask for the backward: ``M = |x_h| <= spec.mask_threshold · s · max_level``, on the negative side of ``int{b}z``
   extended to follow the grid's lower end (:func:`mask_bounds`); ``ste`` masks nothing.

Backward (:class:`FakeQuantize`): ``g_x = IHT(M ⊙ g_{x̂_h})``; with a learned scale also its LSQ gradient.

Sparsity, group scales and outliers (:mod:`bitlaw.kernels.sparsity`, docs/numerics.md §7) act in the stored
domain, between steps 1 and 2: sparsify (the survivors of ``spec.sparse_rule``: top-k of ``|x_h|`` per unit, or
RigL's mask), then pick the outliers among the survivors; step 2 takes the scale from the survivors that are not
outliers only (per group of ``spec.group`` entries of a row when set); step 3 rounds them; pruned entries are
exactly 0 (on grids without a zero level too) and outliers keep their value rounded to bf16. The backward mask
is ``(M ∨ outlier) ∧ R``, ``R`` the sparsity rule's mask (the survivors for ``magnitude`` and ``rigl``, RBBM's band
rule for ``rbbm``). A sparse ``bf16`` spec only sparsifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import Format
from .gradients import code_unit, quantized_backward_matmul
from .hadamard import block_hadamard, inverse_block_hadamard
from .recipe import Recipe, TensorSpec
from .sparsity import SparseState, select


@dataclass
class QuantResult:
    """One quantized tensor, all ``[..., K]`` unless noted, in the rotated domain when ``spec.rotated``.

    values: dequantized values ``x̂_h`` (fp32, or float64 for float64 input).
    codes:  integer codes. ``int{b}``: the odd integers ``2q+1`` in ``[-(2^b-1), 2^b-1]`` (int16) with
            ``values = codes · scale · max_level/(2^b-1)``, i.e. ``codes · step/2``; ``int{b}z``/``int{b}s``: the
            level index ``q - qmin`` in ``[0, qmax - qmin]`` (int16) with ``values = q · step`` exactly, ``(qmin,
            qmax) = Format.integer_range``; other grids: the index of the level in ``Format.levels`` (int16) with
            ``values = levels[codes] · scale``.
    scale:  ``[..., 1]`` per-row multiplier of the unit grid (α for the integer grids, whose largest level is 1);
            with ``spec.group`` ``[..., K/group, 1]``, one per group (it multiplies ``values.unflatten(-1,
            (K/group, group))``).
    step:   ``[..., 1]`` (per group: ``[..., K/group, 1]``) distance between adjacent levels for the integer grids
            (``2α/(2^b-1)`` for ``int{b}``, ``α/qmax`` for ``int{b}z``/``int{b}s``); None otherwise.
    mask:   bool, True where the gradient flows.
    keep:   bool, the survivors of a sparse spec (values are exactly 0 elsewhere; codes there mean nothing);
            None when nothing is pruned.
    outlier: bool, the entries kept in bf16 (``values`` holds them; codes there mean nothing); None without outliers.
    A sparse ``bf16`` spec has no grid: ``codes``, ``scale`` and ``step`` are None.
    """

    values: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    step: torch.Tensor | None
    mask: torch.Tensor
    keep: torch.Tensor | None = None
    outlier: torch.Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference quantizer computes in: float64 stays float64, anything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """``x`` in the domain where ``spec`` quantizes it, in the compute dtype."""
    if spec.rotated:
        return block_hadamard(x, spec.block)
    return x.to(compute_dtype(x.dtype))


def unrotate(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Inverse of :func:`rotate` (without the dtype change)."""
    return inverse_block_hadamard(x, spec.block) if spec.rotated else x


def lsq_alpha_per_parameter(spec: TensorSpec) -> float:
    """α per unit of the learned parameter: 1 for ``lsq`` (the parameter is α), ``(2^b - 1)/2`` for ``lsq_step``
    (the parameter is the step of the centred ``int{b}`` grid, whose largest level is ``α = step · (2^b - 1)/2``)."""
    return (2**spec.fmt.bits - 1) / 2 if spec.scale == "lsq_step" else 1.0


def lsq_q_p(spec: TensorSpec) -> float:
    """LSQ's ``Q_P`` in the gradient scale ``1/sqrt(numel · Q_P)`` of a learned scale.

    ``lsq_step`` (QuEST's LSQ): ``2^(b-1) - 1``, as QuEST's code computes it (7 for int4). ``lsq``: the positive
    clip in steps, ``(n - 1)/2`` for the centred grids of ``n`` levels (7.5 for int4), ``qmax`` for
    ``int{b}z``/``int{b}s``.
    """
    fmt = spec.fmt
    if spec.scale == "lsq_step":
        return 2 ** (fmt.bits - 1) - 1
    return fmt.integer_range[1] if fmt.kind == "intz" else (len(fmt.levels) - 1) / 2


@torch.no_grad()
def initial_lsq_scale(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The initial value (0-dim, compute dtype) of the learned parameter of a ``lsq``/``lsq_step`` role from the first
    tensor ``x`` it quantizes, over the whole (rotated) tensor: ``lsq``: the Gaussian-optimal α, ``c · RMS(x_h)``;
    ``lsq_step``: LSQ's own init as QuEST's code writes it, ``2 · mean|x_h| / sqrt(Q_P)``."""
    x_h = rotate(x.detach(), spec)
    if spec.scale == "lsq_step":
        return 2 * x_h.abs().mean() / math.sqrt(lsq_q_p(spec))
    return spec.gaussian_scale * x_h.square().mean().sqrt()


def row_scale(x_h: torch.Tensor, spec: TensorSpec, lsq_scale: torch.Tensor | None = None,
              where: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scale ``[..., 1]`` of the unit grid, without gradient (LSQ's gradient is in :class:`FakeQuantize`).

    For a learned scale ``lsq_scale`` is the 1-element parameter, used as ``|p| · lsq_alpha_per_parameter(spec)``.
    ``where`` (bool, shape of ``x_h``), if given, limits a computed scale to those entries: the RMS is over them
    only (``sqrt(Σ x² / count)``), the absmax their largest magnitude (docs/numerics.md §7).
    """
    fmt = spec.fmt
    if spec.learned_scale:
        if lsq_scale is None:
            raise ValueError(f"scale={spec.scale!r} needs the learned scale tensor (lsq_scale), got None")
        alpha = lsq_scale.detach().to(x_h.dtype).abs() * lsq_alpha_per_parameter(spec)
        scale = alpha.expand(*x_h.shape[:-1], 1)
    elif spec.scale == "absmax":
        magnitude = x_h.detach().abs() if where is None else torch.where(where, x_h.detach().abs(), 0)
        scale = magnitude.amax(dim=-1, keepdim=True) / fmt.max_level
    elif where is None:
        # RMS over the whole row, no mean subtraction, computed in the compute dtype (docs/numerics.md §3).
        rms = x_h.detach().square().mean(dim=-1, keepdim=True).sqrt()
        scale = spec.gaussian_scale * rms
    else:
        total = torch.where(where, x_h.detach().square(), 0).sum(dim=-1, keepdim=True)
        scale = spec.gaussian_scale * (total / where.sum(dim=-1, keepdim=True).clamp_min(1)).sqrt()
    # An all-zero row would give a zero scale and 0/0 below; the tiny floor maps it to the smallest levels.
    return scale.clamp_min(torch.finfo(x_h.dtype).tiny)


def grid_step(scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """What :func:`dequantize` multiplies the codes by, from the row scale α ``[..., 1]``: the step between levels
    for the integer grids (``2α/(2^b - 1)`` for ``int{b}``, ``α/qmax`` for ``int{b}z``/``int{b}s``), α itself for
    the other grids."""
    if fmt.kind == "int":
        return 2 * scale / (2**fmt.bits - 1)
    if fmt.kind == "intz":
        return scale / fmt.integer_range[1]
    return scale


def round_to_grid(x_h: torch.Tensor, scale: torch.Tensor, fmt: Format
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest-level rounding of ``x_h`` onto ``fmt.levels · scale``: ``(values, codes, step)`` as in QuantResult."""
    return round_with_step(x_h, grid_step(scale, fmt), fmt)


def round_with_step(x_h: torch.Tensor, step_or_scale: torch.Tensor, fmt: Format
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest-level rounding of ``x_h`` onto the grid :func:`dequantize` builds from ``step_or_scale`` (``[..., 1]``:
    the step of the integer grids, the scale of the others): ``(values, codes, step)`` as in QuantResult, the
    values bitwise equal to ``dequantize(codes, step_or_scale, fmt)``."""
    if fmt.kind == "int":
        b = fmt.bits
        step = step_or_scale
        q = torch.clamp(torch.floor(x_h / step), -(2 ** (b - 1)), 2 ** (b - 1) - 1)
        return (q + 0.5) * step, (2 * q + 1).to(torch.int16), step
    if fmt.kind == "intz":
        qmin, qmax = fmt.integer_range
        step = step_or_scale
        # torch.round rounds half to even: a value exactly between two levels goes to the even q (measure zero).
        q = torch.clamp(torch.round(x_h / step), qmin, qmax)
        return q * step, (q - qmin).to(torch.int16), step
    scale = step_or_scale
    levels = torch.tensor(fmt.levels, dtype=x_h.dtype, device=x_h.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(x_h / scale, midpoints)
    return levels[idx] * scale, idx.to(torch.int16), None


def mask_bounds(spec: TensorSpec) -> tuple[float, float]:
    """``(low, high)`` at unit scale for a quantized ``spec``: the gradient mask keeps ``low · s <= x_h <= high · s``
    (``s`` the per-row scale).

    ``high = spec.mask_threshold · max_level`` (docs/numerics.md §4, §6.1). Grids symmetric about 0 give
    ``low = -high``. ``int{b}z`` has one level, ``qmin · step``, below ``-max_level``: there ``trust`` keeps half a
    step beyond that level (the rule ``|x̂_h - x_h| <= step/2`` itself) and ``clip`` scales the grid's own lower
    end by ``clip`` as it does the upper one, so ``clip: 1.0`` keeps the gradient wherever nothing is clipped, on
    every grid. ``ste`` masks nothing: ``(-inf, inf)``. Returns Python floats.
    """
    fmt = spec.fmt
    if spec.grad == "ste":
        return -math.inf, math.inf
    high = spec.mask_threshold * fmt.max_level
    lowest = fmt.levels[0]
    if spec.grad == "clip":
        return spec.mask_threshold * lowest, high
    if lowest == -fmt.max_level:
        return -high, high
    return lowest - (fmt.levels[1] - lowest) / 2, high


def quantize(x: torch.Tensor, spec: TensorSpec, lsq_scale: torch.Tensor | None = None,
             sparse: SparseState | None = None) -> QuantResult:
    """Quantize ``x`` (``[..., K]``) by ``spec`` without autograd. See :class:`QuantResult`.

    ``sparse`` carries what a weight's sparsity needs beyond the spec (the scheduled sparsity, RigL's mask;
    :class:`~bitlaw.kernels.sparsity.SparseState`); None: the spec's final sparsity. Raises ValueError for specs
    that neither quantize nor sparsify (``bf16``: nothing to do) and when the block does not divide ``K``.
    """
    if not spec.compressed:
        raise ValueError(f"spec format {spec.format!r} is not quantized; nothing to quantize")
    x_h = rotate(x, spec)
    chosen = select(x_h, spec, sparse)
    if not spec.quantized:  # a sparse bf16 spec: the survivors as they are
        return QuantResult(values=torch.where(chosen.keep, x_h, 0), codes=None, scale=None, step=None,
                           mask=chosen.grad, keep=chosen.keep)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        # One scale per group of spec.group entries: the rows are cut into groups, each quantized as a row.
        return t.unflatten(-1, (t.shape[-1] // spec.group, spec.group)) if spec.group else t

    on_grid = chosen.on_grid
    x_g = grouped(x_h)
    scale = row_scale(x_g, spec, lsq_scale, None if on_grid is None else grouped(on_grid))
    values, codes, step = round_to_grid(x_g, scale, spec.fmt)
    low, high = mask_bounds(spec)
    mask = (x_g >= low * scale) & (x_g <= high * scale)
    values, codes, mask = (t.reshape(x_h.shape) for t in (values, codes, mask))
    if chosen.outlier is not None:
        values = torch.where(chosen.outlier, x_h.to(torch.bfloat16).to(x_h.dtype), values)
        mask = mask | chosen.outlier  # not clipped: the gradient of an outlier passes
    if chosen.keep is not None:
        values = torch.where(chosen.keep, values, 0)
        mask = mask & chosen.grad
    return QuantResult(values=values, codes=codes, scale=scale, step=step, mask=mask, keep=chosen.keep,
                       outlier=chosen.outlier)


class FakeQuantize(torch.autograd.Function):
    """``x`` → ``x̂_h`` (rotated domain, compute dtype) with the masked, inverse-rotated gradient.

    Inputs: ``x`` ``[..., K]``; ``lsq_scale`` the 1-element learned parameter of a ``lsq``/``lsq_step`` spec (else
    None); ``spec``;
    ``stats`` an optional dict that receives ``masked_fraction`` (float tensor, the share of entries with M=0) and
    ``step`` (``QuantResult.step``, detached; None for grids without one);
    ``sparse`` the weight's :class:`~bitlaw.kernels.sparsity.SparseState` or None. When ``sparse.grad_sink`` is a
    dict, backward adds the unmasked gradient of the values (stored domain) to its ``"dense_grad"`` (RigL's grow
    criterion).
    """

    @staticmethod
    def forward(ctx, x, lsq_scale, spec: TensorSpec, stats: dict | None, sparse: SparseState | None):  # noqa: D102
        res = quantize(x, spec, lsq_scale, sparse)
        ctx.grad_sink = None if sparse is None else sparse.grad_sink
        if stats is not None:
            stats["masked_fraction"] = 1.0 - res.mask.float().mean().detach()
            stats["step"] = None if res.step is None else res.step.detach()
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        if lsq_scale is not None and spec.learned_scale:
            # d x̂/dα: (level − x/α) inside the grid, the clip level outside (LSQ), times dα/d(parameter);
            # gradient scale 1/sqrt(numel·Q_P).
            x_h = rotate(x, spec)
            fmt = spec.fmt
            inside = (x_h >= fmt.levels[0] * res.scale) & (x_h <= fmt.max_level * res.scale)
            dvalue_dscale = torch.where(inside, (res.values - x_h) / res.scale, res.values / res.scale)
            dvalue_dscale = dvalue_dscale * lsq_alpha_per_parameter(spec)
            ctx.lsq_grad_scale = 1.0 / math.sqrt(x.numel() * lsq_q_p(spec))
            ctx.save_for_backward(res.mask, dvalue_dscale, lsq_scale)
        else:
            ctx.save_for_backward(res.mask)
        return res.values

    @staticmethod
    def backward(ctx, grad_values):  # noqa: D102
        spec: TensorSpec = ctx.spec
        mask = ctx.saved_tensors[0]
        if ctx.grad_sink is not None:
            ctx.grad_sink["dense_grad"] = ctx.grad_sink.get("dense_grad", 0) + grad_values.detach()
        grad_x = unrotate(grad_values * mask, spec).to(ctx.x_dtype)
        grad_scale = None
        if len(ctx.saved_tensors) == 3:
            dvalue_dscale, lsq_scale = ctx.saved_tensors[1:]
            total = (grad_values * dvalue_dscale).sum() * ctx.lsq_grad_scale
            grad_scale = (total * torch.sign(lsq_scale)).reshape(lsq_scale.shape).to(lsq_scale.dtype)
        return grad_x, grad_scale, None, None, None


def fake_quantize(x: torch.Tensor, spec: TensorSpec, lsq_scale: torch.Tensor | None = None,
                  stats: dict | None = None, sparse: SparseState | None = None) -> torch.Tensor:
    """Differentiable quantization of ``x`` by ``spec``, returned in the **rotated** domain when ``spec.rotated``.

    For ``bf16`` specs without sparsity returns ``x`` unchanged. Output dtype: the compute dtype (fp32 or float64).
    ``sparse``: see :class:`FakeQuantize`.
    """
    if not spec.compressed:
        return x
    return FakeQuantize.apply(x, lsq_scale, spec, stats, sparse)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                     weight_lsq_scale: torch.Tensor | None = None, input_lsq_scale: torch.Tensor | None = None,
                     stats: dict | None = None, weight_sparse: SparseState | None = None,
                     grad_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``y = Q_in(x) · Q_w(w)ᵀ (+ bias)``: the reference forward and backward of a quantized linear layer.

    x: ``[..., K]``; weight: ``[N, K]``; returns ``[..., N]`` in ``x.dtype``. When both roles are quantized in
    the same rotated domain the product is taken there (``x̂_h ŵ_hᵀ``, docs/numerics.md §4); a role quantized in a
    different domain than the other (e.g. weight-only recipes: rotated weight, plain input) is rotated back
    first, except the weight of a ``layout='rotated'`` recipe, used as ``Q(W·H)`` (``y = x · Q(W·H)ᵀ``).
    ``stats``, if given, receives ``weight_masked_fraction`` / ``input_masked_fraction``. ``weight_sparse``: the
    weight's :class:`~bitlaw.kernels.sparsity.SparseState` (schedule, RigL mask), None for the spec's own sparsity.
    With ``recipe.grad_input`` / ``recipe.grad_weight`` quantized, the backward GEMMs quantize the output gradient
    (:mod:`bitlaw.kernels.gradients`), seeded by ``grad_seed`` (a 0-dim int64 tensor; None draws one).
    """
    w_stats = {} if (stats is not None or recipe.quantized_backward) and recipe.weight.compressed else None
    wq = fake_quantize(weight, recipe.weight, weight_lsq_scale, w_stats, weight_sparse)
    weight_unit = code_unit(w_stats.get("step"), recipe.weight) if w_stats else None
    y = linear_given_operand(x, weight_operand(wq, recipe), recipe, bias, input_lsq_scale, stats,
                             weight_unit if _same_domain(recipe) else None, grad_seed)
    if w_stats and stats is not None:
        stats["weight_masked_fraction"] = w_stats["masked_fraction"]
    return y


def reference_linear_given_weight(x: torch.Tensor, weight_values: torch.Tensor, recipe: Recipe,
                                 bias: torch.Tensor | None = None, input_lsq_scale: torch.Tensor | None = None,
                                 stats: dict | None = None) -> torch.Tensor:
    """The rest of :func:`reference_linear` given the weight already quantized: ``weight_values`` is ``ŵ``
    ``[N, K]`` as :func:`fake_quantize` returns it (rotated domain when ``recipe.weight.rotated``).

    Shared by training and the inference layers of exported models, so both compute bitwise the same thing.
    """
    return linear_given_operand(x, weight_operand(weight_values, recipe), recipe, bias, input_lsq_scale, stats)


def _same_domain(recipe: Recipe) -> bool:
    """Whether the quantized input and weight meet in one domain (both rotated alike, or neither)."""
    w_spec, x_spec = recipe.weight, recipe.input
    return w_spec.rotated == x_spec.rotated and (not w_spec.rotated or w_spec.block == x_spec.block)


def weight_operand(weight_values: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """What :func:`reference_linear_given_weight` multiplies the input by, from ``ŵ`` ``[N, K]``: ``ŵ`` rotated back
    when input and weight are in different domains under the ``rotate_back`` layout, else ``ŵ``. Depends on the
    weight only, so inference layers with fixed weights may compute it once."""
    if not _same_domain(recipe) and recipe.layout == "rotate_back":
        return unrotate(weight_values, recipe.weight)
    return weight_values


def linear_given_operand(x: torch.Tensor, operand: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                         input_lsq_scale: torch.Tensor | None = None, stats: dict | None = None,
                         weight_unit: torch.Tensor | None = None, grad_seed: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """:func:`reference_linear_given_weight` given :func:`weight_operand`'s result ``[N, K]``. ``weight_unit``
    ``[N]``: the operand's value per code unit (half its row step), which a quantized backward folds into the
    gradient (:mod:`bitlaw.kernels.gradients`); ``grad_seed``: that backward's seed."""
    x_spec = recipe.input
    backward = recipe.quantized_backward
    x_stats = {} if (stats is not None or backward) and x_spec.compressed else None
    xq = fake_quantize(x, x_spec, input_lsq_scale, x_stats)
    x_unit = code_unit(x_stats.get("step"), x_spec) if x_stats else None
    if not _same_domain(recipe):
        # layout 'rotated' (weight-only, QuEST's runs) multiplies the plain input by Q(W·H) as it is.
        xq, x_unit = unrotate(xq, x_spec), None
    dtype = torch.promote_types(xq.dtype, operand.dtype)
    if backward:
        y = quantized_backward_matmul(xq.to(dtype), operand.to(dtype), recipe, x_unit, weight_unit, grad_seed)
    else:
        y = torch.matmul(xq.to(dtype), operand.to(dtype).t())
    if bias is not None:
        y = y + bias
    if x_stats and stats is not None:
        stats["input_masked_fraction"] = x_stats["masked_fraction"]
    return y.to(x.dtype)


def dequantize(codes: torch.Tensor, step_or_scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Values of :func:`quantize`'s result from its codes, with the same arithmetic (so bitwise equal).

    ``int{b}``: ``codes`` are the odd integers ``2q+1`` and ``step_or_scale`` the per-row ``step``
    (``[..., 1]``); ``int{b}z``/``int{b}s``: level indices ``q - qmin`` and the per-row ``step``; other grids: level
    indices and the per-row ``scale``. Returns the dtype of ``step_or_scale``.
    """
    if fmt.kind == "int":
        q = torch.div(codes.to(torch.int32) - 1, 2, rounding_mode="floor").to(step_or_scale.dtype)
        return (q + 0.5) * step_or_scale
    if fmt.kind == "intz":
        q = (codes.to(torch.int32) + fmt.integer_range[0]).to(step_or_scale.dtype)
        return q * step_or_scale
    levels = torch.tensor(fmt.levels, dtype=step_or_scale.dtype, device=codes.device)
    return levels[codes.long()] * step_or_scale
