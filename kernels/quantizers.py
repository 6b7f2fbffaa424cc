"""Reference quantizers in plain PyTorch: QuEST and its baselines, the oracle for every fused kernel.

Rows run along the last (reduction) dimension: a weight ``[out, in]`` has one row per output channel, an
activation ``[..., in]`` one row per token. For a :class:`~kernels.recipe.TensorSpec` ``spec``:

1. rotate: ``x_h = x · blockdiag(H)`` if ``spec.rotated`` (fp32, or float64 for float64 input);
2. scale: a per-row scale ``s`` multiplying the format's unit grid (``gaussian_rms``: ``c · RMS(x_h)``,
   ``absmax``: ``max|x_h| / max_level``, ``lsq``: one learned scalar);
3. round to the nearest grid level (for ``int{b}``: the centred floor formula of docs/numerics.md §3; for
   ``int{b}z``/``int{b}s``: ``q = clamp(round(x_h / step), qmin, qmax)``, docs/numerics.md §6.1);
4. mask for the backward: ``M = |x_h| <= spec.mask_threshold · s · max_level``, on the negative side of ``int{b}z``
   extended to follow the grid's lower end (:func:`mask_bounds`).

Backward (:class:`FakeQuantize`): ``g_x = IHT(M ⊙ g_{x̂_h})``; with ``lsq`` also the LSQ gradient of the scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitlaw.kernels.formats import Format
from bitlaw.kernels.hadamard import block_hadamard, inverse_block_hadamard
from bitlaw.kernels.recipe import Recipe, TensorSpec


@dataclass
class QuantResult:
    """One quantized tensor, all ``[..., K]`` unless noted, in the rotated domain when ``spec.rotated``.

    values: dequantized values ``x̂_h`` (fp32, or float64 for float64 input).
    codes:  integer codes. ``int{b}``: the odd integers ``2q+1`` in ``[-(2^b-1), 2^b-1]`` (int16) with
            ``values = codes · scale · max_level/(2^b-1)``, i.e. ``codes · step/2``; ``int{b}z``/``int{b}s``: the
            level index ``q - qmin`` in ``[0, qmax - qmin]`` (int16) with ``values = q · step`` exactly, ``(qmin,
            qmax) = Format.integer_range``; other grids: the index of the level in ``Format.levels`` (int16) with
            ``values = levels[codes] · scale``.
    scale:  ``[..., 1]`` per-row multiplier of the unit grid (α for the integer grids, whose largest level is 1).
    step:   ``[..., 1]`` distance between adjacent levels for the integer grids (``2α/(2^b-1)`` for ``int{b}``,
            ``α/qmax`` for ``int{b}z``/``int{b}s``); None otherwise.
    mask:   bool, True where the gradient flows.
    """

    values: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    step: torch.Tensor | None
    mask: torch.Tensor


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


def row_scale(x_h: torch.Tensor, spec: TensorSpec, lsq_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scale ``[..., 1]`` of the unit grid, without gradient (LSQ's gradient is in :class:`FakeQuantize`)."""
    fmt = spec.fmt
    if spec.scale == "lsq":
        if lsq_scale is None:
            raise ValueError("scale='lsq' needs the learned scale tensor (lsq_scale), got None")
        scale = lsq_scale.detach().to(x_h.dtype).abs().expand(*x_h.shape[:-1], 1)
    elif spec.scale == "absmax":
        scale = x_h.detach().abs().amax(dim=-1, keepdim=True) / fmt.max_level
    else:
        # RMS over the whole row, no mean subtraction, computed in the compute dtype (docs/numerics.md §3).
        rms = x_h.detach().square().mean(dim=-1, keepdim=True).sqrt()
        scale = spec.gaussian_scale * rms
    # An all-zero row would give a zero scale and 0/0 below; the tiny floor maps it to the smallest levels.
    return scale.clamp_min(torch.finfo(x_h.dtype).tiny)


def round_to_grid(x_h: torch.Tensor, scale: torch.Tensor, fmt: Format
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest-level rounding of ``x_h`` onto ``fmt.levels · scale``: ``(values, codes, step)`` as in QuantResult."""
    if fmt.kind == "int":
        b = fmt.bits
        step = 2 * scale / (2**b - 1)
        q = torch.clamp(torch.floor(x_h / step), -(2 ** (b - 1)), 2 ** (b - 1) - 1)
        return (q + 0.5) * step, (2 * q + 1).to(torch.int16), step
    if fmt.kind == "intz":
        qmin, qmax = fmt.integer_range
        step = scale / qmax
        # torch.round rounds half to even: a value exactly between two levels goes to the even q (measure zero).
        q = torch.clamp(torch.round(x_h / step), qmin, qmax)
        return q * step, (q - qmin).to(torch.int16), step
    levels = torch.tensor(fmt.levels, dtype=x_h.dtype, device=x_h.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(x_h / scale, midpoints)
    return levels[idx] * scale, idx.to(torch.int16), None


def mask_bounds(spec: TensorSpec) -> tuple[float, float]:
    """``(low, high)`` at unit scale for a quantized ``spec``: the gradient mask keeps ``low · s <= x_h <= high · s``
    (``s`` the per-row scale).

    ``high = spec.mask_threshold · max_level`` (docs/numerics.md §4, §6.1). Grids symmetric about 0 give
    ``low = -high``. ``int{b}z`` has one level, ``qmin · step``, below ``-max_level``: there ``trust`` keeps half a
    step beyond that level (the rule ``|x̂_h - x_h| <= step/2`` itself) and ``ste`` keeps up to it (gradient
    wherever nothing is clipped), so both follow the grid's own lower end; ``clip`` stays ``±clip · α``. Returns
    Python floats.
    """
    fmt = spec.fmt
    high = spec.mask_threshold * fmt.max_level
    lowest = fmt.levels[0]
    if spec.grad == "clip" or lowest == -fmt.max_level:
        return -high, high
    if spec.grad == "trust":
        return lowest - (fmt.levels[1] - lowest) / 2, high
    return lowest, high


def quantize(x: torch.Tensor, spec: TensorSpec, lsq_scale: torch.Tensor | None = None) -> QuantResult:
    """Quantize ``x`` (``[..., K]``) by ``spec`` without autograd. See :class:`QuantResult`.

    Raises ValueError for ``bf16`` specs (nothing to quantize) and when the block does not divide ``K``.
    """
    if not spec.quantized:
        raise ValueError(f"spec format {spec.format!r} is not quantized; nothing to quantize")
    fmt = spec.fmt
    x_h = rotate(x, spec)
    scale = row_scale(x_h, spec, lsq_scale)
    values, codes, step = round_to_grid(x_h, scale, fmt)
    low, high = mask_bounds(spec)
    mask = (x_h >= low * scale) & (x_h <= high * scale)
    return QuantResult(values=values, codes=codes, scale=scale, step=step, mask=mask)


class FakeQuantize(torch.autograd.Function):
    """``x`` → ``x̂_h`` (rotated domain, compute dtype) with the masked, inverse-rotated gradient.

    Inputs: ``x`` ``[..., K]``; ``lsq_scale`` a 1-element tensor for ``scale='lsq'`` (else None); ``spec``;
    ``stats`` an optional dict that receives ``masked_fraction`` (float tensor, the share of entries with M=0).
    """

    @staticmethod
    def forward(ctx, x, lsq_scale, spec: TensorSpec, stats: dict | None):  # noqa: D102
        res = quantize(x, spec, lsq_scale)
        if stats is not None:
            stats["masked_fraction"] = 1.0 - res.mask.float().mean().detach()
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        if lsq_scale is not None and spec.scale == "lsq":
            # d x̂/d s: (level − x/s) inside the grid, the clip level outside (LSQ); gradient scale 1/sqrt(n·q_max).
            x_h = rotate(x, spec)
            fmt = spec.fmt
            inside = (x_h >= fmt.levels[0] * res.scale) & (x_h <= fmt.max_level * res.scale)
            dvalue_dscale = torch.where(inside, (res.values - x_h) / res.scale, res.values / res.scale)
            # LSQ's Q_P, the positive clip in steps: qmax for int{b}z/int{b}s, (n - 1)/2 for the centred grids.
            q_max = fmt.integer_range[1] if fmt.kind == "intz" else (len(fmt.levels) - 1) / 2
            ctx.lsq_grad_scale = 1.0 / math.sqrt(x.numel() * q_max)
            ctx.save_for_backward(res.mask, dvalue_dscale, lsq_scale)
        else:
            ctx.save_for_backward(res.mask)
        return res.values

    @staticmethod
    def backward(ctx, grad_values):  # noqa: D102
        spec: TensorSpec = ctx.spec
        mask = ctx.saved_tensors[0]
        grad_x = unrotate(grad_values * mask, spec).to(ctx.x_dtype)
        grad_scale = None
        if len(ctx.saved_tensors) == 3:
            dvalue_dscale, lsq_scale = ctx.saved_tensors[1:]
            total = (grad_values * dvalue_dscale).sum() * ctx.lsq_grad_scale
            grad_scale = (total * torch.sign(lsq_scale)).reshape(lsq_scale.shape).to(lsq_scale.dtype)
        return grad_x, grad_scale, None, None


def fake_quantize(x: torch.Tensor, spec: TensorSpec, lsq_scale: torch.Tensor | None = None,
                  stats: dict | None = None) -> torch.Tensor:
    """Differentiable quantization of ``x`` by ``spec``, returned in the **rotated** domain when ``spec.rotated``.

    For ``bf16`` specs returns ``x`` unchanged. Output dtype: the compute dtype (fp32 or float64).
    """
    if not spec.quantized:
        return x
    return FakeQuantize.apply(x, lsq_scale, spec, stats)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                     weight_lsq_scale: torch.Tensor | None = None, input_lsq_scale: torch.Tensor | None = None,
                     stats: dict | None = None) -> torch.Tensor:
    """``y = Q_in(x) · Q_w(w)ᵀ (+ bias)``: the reference forward and backward of a quantized linear layer.

    x: ``[..., K]``; weight: ``[N, K]``; returns ``[..., N]`` in ``x.dtype``. When both roles are quantized in
    the same rotated domain the product is taken there (``x̂_h ŵ_hᵀ``, docs/numerics.md §4); a role quantized in a
    different domain than the other (e.g. weight-only recipes: rotated weight, plain input) is rotated back
    first. ``stats``, if given, receives ``weight_masked_fraction`` / ``input_masked_fraction``.
    """
    w_stats = {} if stats is not None and recipe.weight.quantized else None
    wq = fake_quantize(weight, recipe.weight, weight_lsq_scale, w_stats)
    y = reference_linear_given_weight(x, wq, recipe, bias, input_lsq_scale, stats)
    if w_stats:
        stats["weight_masked_fraction"] = w_stats["masked_fraction"]
    return y


def reference_linear_given_weight(x: torch.Tensor, weight_values: torch.Tensor, recipe: Recipe,
                                 bias: torch.Tensor | None = None, input_lsq_scale: torch.Tensor | None = None,
                                 stats: dict | None = None) -> torch.Tensor:
    """The rest of :func:`reference_linear` given the weight already quantized: ``weight_values`` is ``ŵ``
    ``[N, K]`` as :func:`fake_quantize` returns it (rotated domain when ``recipe.weight.rotated``).

    Shared by training and the inference layers of exported models, so both compute bitwise the same thing.
    """
    w_spec, x_spec = recipe.weight, recipe.input
    x_stats = {} if stats is not None and x_spec.quantized else None
    wq = weight_values
    xq = fake_quantize(x, x_spec, input_lsq_scale, x_stats)
    same_domain = w_spec.rotated == x_spec.rotated and (not w_spec.rotated or w_spec.block == x_spec.block)
    if not same_domain:
        wq = unrotate(wq, w_spec)
        xq = unrotate(xq, x_spec)
    dtype = torch.promote_types(xq.dtype, wq.dtype)
    y = torch.matmul(xq.to(dtype), wq.to(dtype).t())
    if bias is not None:
        y = y + bias
    if x_stats:
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
