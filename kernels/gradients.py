"""Quantized backward GEMMs, reference implementation: the output gradient in int8 or fp8 (docs/numerics.md §8).

A quantized linear computes ``y = x̂ ŵᵀ``; its backward takes two GEMMs with the output gradient ``g_y`` ``[M, N]``:
``g_x̂ = g_y · ŵ`` (``grad_input``, reduced over the ``N`` output channels) and ``g_ŵ = g_yᵀ · x̂`` (``grad_weight``,
reduced over the ``M`` tokens). A recipe's :class:`~bitlaw.kernels.recipe.GradSpec` per GEMM quantizes ``g_y`` for it:

1. fold: multiply ``g_y`` along the reduced dimension by the other operand's value per code unit ``u`` (half the
   weight's row step for ``grad_input``, half the input's token step for ``grad_weight``; 1 when that operand has no
   per-row step), so the other operand enters the GEMM as its integer codes ``ŵ/u`` exactly;
2. rotate (``hadamard``): ``·H`` by blocks along the reduced dimension (zero-padded to whole blocks); the inverse is
   folded into the other operand, so here the quantized operand is rotated back, which is the same product;
3. scale: absmax per token, per channel or per block of the reduced dimension, mapped onto the format's largest
   value (127, 448, 57344);
4. round onto the format's grid, nearest (half up) or stochastic (``floor(v/Δ + ξ)·Δ``, ``ξ ~ U[0, 1)``, ``Δ`` the
   grid spacing at ``v``: unbiased, variance ``(v − a)(b − v)`` between neighbours ``a < v < b``);
5. the GEMM with the quantized ``g_y`` divided back by ``u``: ``(Q(g_y·u)/u) · ŵ``.

Random bits: a counter-based generator, one 32-bit hash per entry of ``g_y``, ``h = hash32(i + hash32(seed))`` with
``i = m·N + n``, modulo 2^32 (:func:`uniform_pair`); its high 16 bits give ``grad_input``'s ``ξ``, its low 16 bits
``grad_weight``'s, each ``(k + ½)/2^16``: the mean of a rounding is within ``2^-17`` of a step of the exact value.
The Triton kernels compute the same numbers, so both paths round alike bit for bit. :func:`noise_context` and
:func:`layer_seed` give every layer call, micro-batch and DDP rank its own seed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .formats import get_format
from .hadamard import block_hadamard
from .recipe import GRAD_FORMATS, GradSpec, Recipe, TensorSpec


@dataclass(frozen=True)
class GradGrid:
    """A gradient format's grid: ``largest`` value; fp8: ``min_exponent`` of its normal numbers and
    ``mantissa_bits`` (spacing ``2^(max(e, min_exponent) − mantissa_bits)`` at a value of exponent ``e``); int8:
    None (spacing 1)."""

    largest: float
    min_exponent: int | None = None
    mantissa_bits: int | None = None


def _grid(name: str) -> GradGrid:
    """The grid of a gradient format, from the project's own description of the format (``kernels.formats``):
    ``int8`` is the symmetric integer range of ``int8s`` (±127), the fp8 formats their OCP encodings."""
    fmt = get_format("int8s" if name == "int8" else name)
    if fmt.kind == "intz":
        return GradGrid(float(fmt.integer_range[1]))
    # Normal numbers start at exponent 1 − bias, bias = 2^(E−1) − 1.
    return GradGrid(fmt.levels[-1], 2 - 2 ** (fmt.exponent_bits - 1), fmt.mantissa_bits)


GRIDS = {name: _grid(name) for name in GRAD_FORMATS if name != "bf16"}


def grid_spacing(v: torch.Tensor, grid: GradGrid) -> torch.Tensor:
    """The distance between the two grid values around each entry of ``v`` (fp32), exact: read from the exponent
    bits, so no ``log2`` rounding can pick the wrong binade."""
    if grid.min_exponent is None:
        return torch.ones_like(v)
    exponent = ((v.abs().view(torch.int32) >> 23) & 255) - 127
    exponent = exponent.clamp_min(grid.min_exponent) - grid.mantissa_bits
    return ((exponent + 127) << 23).view(torch.float32)


_MASK32 = 0xFFFFFFFF
# The multipliers of a 32-bit integer mixer with low bias (xor-shift, multiply, twice; C. Wellons' "lowbias32").
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def _signed32(value: int) -> int:
    """The int32 with the bits of the 32-bit unsigned ``value``."""
    value &= _MASK32
    return value - 2**32 if value >= 2**31 else value


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixer of the generator on int32 tensors (the bits of unsigned 32-bit values; multiplication wraps
    modulo 2^32, and the masks make the right shifts logical)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _signed32(HASH_MULTIPLIERS[0])
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _signed32(HASH_MULTIPLIERS[1])
    return x ^ ((x >> 16) & 0xFFFF)


def seed_key(seed: int) -> int:
    """The key of a seed, ``hash32(seed mod 2^32)``, as an unsigned 32-bit integer."""
    return int(hash32(torch.tensor(_signed32(seed), dtype=torch.int32))) & _MASK32


def uniform_pair(seed: int, m: int, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform numbers of one layer call's backward for ``g_y`` ``[m, n]``: ``(ξ_input, ξ_weight)``, both
    ``[m, n]`` fp32 in ``(0, 1)``, ``((h >> 16) + ½)·2^-16`` and ``((h & 0xFFFF) + ½)·2^-16`` for
    ``h = hash32(m_i·n + n_i + seed_key(seed) mod 2^32)``: what the kernels draw."""
    # The counter modulo 2^32, as int32 bits (int32 addition wraps).
    if m * n <= 2**31:
        index = torch.arange(m * n, dtype=torch.int32, device=device)
    else:
        index = torch.arange(m * n, dtype=torch.int64, device=device) & _MASK32
        index = torch.where(index >= 2**31, index - 2**32, index).to(torch.int32)
    bits = hash32(index + _signed32(seed_key(seed))).reshape(m, n)
    high, low = (bits >> 16) & 0xFFFF, bits & 0xFFFF
    return (high.to(torch.float32) + 0.5) * 2.0**-16, (low.to(torch.float32) + 0.5) * 2.0**-16


def round_scaled(v: torch.Tensor, grid: GradGrid, uniform: torch.Tensor | None) -> torch.Tensor:
    """``v`` (fp32, already scaled so ``|v| ≤ grid.largest`` up to rounding) onto the grid: ``floor(v/Δ + ξ)·Δ`` with
    ``ξ = uniform`` (stochastic) or ``0.5`` (nearest, ties up), clamped to ``±grid.largest``; int8 only from above:
    when the scale's float rounding puts ``v`` a few ulps below −127, a stochastic floor reaches −128, which int8
    holds and which keeps that rounding unbiased (what the kernels compute; nearest never goes below −127)."""
    shift = 0.5 if uniform is None else uniform
    if grid.min_exponent is None:  # int8: spacing 1, so no division (the same numbers, fewer passes on the CPU)
        return torch.floor(v + shift).clamp_(max=grid.largest)
    spacing = grid_spacing(v, grid)
    return (torch.floor(v / spacing + shift) * spacing).clamp(-grid.largest, grid.largest)


def _groups(t: torch.Tensor, scale: str, block: int) -> torch.Tensor:
    """``t`` ``[R, C]`` viewed so that one absmax per last-dimension slice is one scale: ``row`` ``[R, C]``,
    ``column`` ``[C, R]``, ``block`` ``[R, C/block, block]`` (``C`` a multiple of ``block``)."""
    if scale == "row":
        return t
    if scale == "column":
        return t.t()
    return t.unflatten(-1, (t.shape[-1] // block, block))


def _ungroup(t: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "row":
        return t
    if scale == "column":
        return t.t()
    return t.flatten(-2)


def _pad_to(t: torch.Tensor, block: int) -> torch.Tensor:
    pad = -t.shape[-1] % block
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def quantize_operand(t: torch.Tensor, spec: GradSpec, scale: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``t`` ``[R, C]`` (the gradient operand of a GEMM reduced over ``C``) by ``spec``: returns fp32
    ``[R, C]``, in ``t``'s (unrotated) domain.

    ``scale``: ``row`` (one absmax per row), ``column`` (per reduced index, over all rows) or ``block`` (per
    ``spec.block`` entries of a row). ``noise``: ``ξ`` ``[R, C]`` in ``[0, 1)`` for stochastic rounding (required then;
    :func:`uniform_pair`).
    The reduced dimension is zero-padded to whole blocks for ``block`` scales and the rotation; zeros stay zeros.
    """
    if spec.stochastic and (noise is None or noise.shape != t.shape):
        raise ValueError(f"quantize_operand: stochastic rounding needs noise of the operand's shape {tuple(t.shape)}, "
                         f"got {None if noise is None else tuple(noise.shape)}")
    grid = GRIDS[spec.format]
    c = t.shape[-1]
    v = t.float()
    if spec.hadamard or scale == "block":
        v = _pad_to(v, spec.block)
    if spec.hadamard:
        v = block_hadamard(v, spec.block)
    grouped = _groups(v, scale, spec.block)
    absmax = grouped.abs().amax(dim=-1, keepdim=True)
    # An all-zero group keeps a tiny positive scale: its entries round to 0 whatever the rounding.
    step = (absmax / grid.largest).clamp_min(torch.finfo(torch.float32).tiny)
    if noise is not None:
        noise = _groups(_pad_to(noise, spec.block) if v.shape[-1] != c else noise, scale, spec.block)
    # One reciprocal per group, then a multiply per entry: the kernels' arithmetic.
    out = _ungroup(round_scaled(grouped * (1 / step), grid, noise) * step, scale)
    if spec.hadamard:
        out = block_hadamard(out, spec.block)
    return out[..., :c]


# The granularity of GradSpec.scale in terms of each GEMM's gradient operand: grad_input multiplies g_y [M, N] (rows
# are tokens), grad_weight g_yᵀ [N, M] (rows are channels).
OPERAND_SCALE = {"grad_input": {"token": "row", "channel": "column", "block": "block"},
                 "grad_weight": {"token": "column", "channel": "row", "block": "block"}}


def _mix(*parts: object) -> int:
    # A stable hash (not Python's salted hash()): the same parts give the same seed in every process.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class _Noise:
    seed: int = 0
    rank: int = 0
    index: int = 0
    calls: dict[str, int] = field(default_factory=dict)


_NOISE = _Noise()


def set_noise_context(seed: int, rank: int, index: int) -> None:
    """Key the random bits of the stochastic backward from now on: ``seed`` (the run's), ``rank`` (the DDP rank: ranks
    draw independent bits) and ``index`` (the micro-batch: global step × accumulation + micro-batch index). Called by
    the trainer before every training micro-batch; resets the per-layer call counts."""
    _NOISE.seed, _NOISE.rank, _NOISE.index = int(seed), int(rank), int(index)
    _NOISE.calls = {}


@contextlib.contextmanager
def noise_context(seed: int, rank: int, index: int) -> Iterator[None]:
    """:func:`set_noise_context` for a block, the previous context restored after it."""
    saved = (_NOISE.seed, _NOISE.rank, _NOISE.index, dict(_NOISE.calls))
    set_noise_context(seed, rank, index)
    try:
        yield
    finally:
        _NOISE.seed, _NOISE.rank, _NOISE.index, _NOISE.calls = saved


@torch.compiler.disable  # a side effect per call (the count): it must run every step, not once at trace time
def layer_seed(key: str) -> torch.Tensor:
    """The seed (0-dim int64 CPU tensor, 31 bits) of this call of the layer named ``key``: a function of the noise
    context and of how many times ``key`` was called in it, so a layer called twice in one micro-batch draws twice."""
    count = _NOISE.calls.get(key, 0)
    _NOISE.calls[key] = count + 1
    return torch.tensor(_mix(_NOISE.seed, _NOISE.rank, _NOISE.index, key, count), dtype=torch.int64)


def _grad_operand(g: torch.Tensor, unit: torch.Tensor | None, spec: GradSpec, role: str,
                  noise: torch.Tensor | None) -> torch.Tensor:
    """``Q(g·u)/u`` for the gradient operand ``g`` ``[R, C]`` reduced over ``C``, ``u`` ``[C]`` or None."""
    if unit is None:
        return quantize_operand(g, spec, OPERAND_SCALE[role][spec.scale], noise)
    return quantize_operand(g * unit, spec, OPERAND_SCALE[role][spec.scale], noise) / unit


class QuantizedBackwardMatmul(torch.autograd.Function):
    """``y = a · bᵀ`` (``a`` ``[M, K]``, ``b`` ``[N, K]``, one dtype) whose backward quantizes ``g_y`` per the recipe's
    ``grad_input`` (``g_a = Q(g_y)·b``) and ``grad_weight`` (``g_b = Q(g_yᵀ)·a``), see the module docstring.

    ``a_unit`` ``[M]`` / ``b_unit`` ``[N]``: the value per code unit of each row of ``a`` / ``b`` (None: 1); ``seed``:
    a 0-dim int64 tensor (:func:`layer_seed`).
    """

    @staticmethod
    def forward(ctx, a, b, recipe: Recipe, a_unit, b_unit, seed):  # noqa: D102
        ctx.save_for_backward(a, b, a_unit, b_unit)
        ctx.recipe, ctx.seed = recipe, int(seed)
        return a @ b.t()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        a, b, a_unit, b_unit = ctx.saved_tensors
        recipe: Recipe = ctx.recipe
        grad_a = grad_b = None
        noise_a = noise_b = None
        if recipe.grad_input.stochastic or recipe.grad_weight.stochastic:
            noise_a, noise_b = uniform_pair(ctx.seed, *grad.shape, device=grad.device)
        if ctx.needs_input_grad[0]:
            spec = recipe.grad_input
            g = _grad_operand(grad, b_unit, spec, "grad_input", noise_a) if spec.quantized else grad
            grad_a = (g.to(b.dtype) @ b).to(a.dtype)
        if ctx.needs_input_grad[1]:
            spec = recipe.grad_weight
            g = _grad_operand(grad.t(), a_unit, spec, "grad_weight", noise_b.t() if noise_b is not None else None) \
                if spec.quantized else grad.t()
            grad_b = (g.to(a.dtype) @ a).to(b.dtype)
        return grad_a, grad_b, None, None, None, None


def code_unit(step: torch.Tensor | None, spec: TensorSpec) -> torch.Tensor | None:
    """The value of one code unit per row from the ``step`` ``[..., 1]`` of a tensor quantized by ``spec``
    (``QuantResult.step``): half the step for QuEST's odd grids (codes ``2q+1``), the step for grids with a zero
    level; None for other grids and for group scales (no single unit per row). Returns ``[rows]`` fp32."""
    if step is None or spec.fmt.kind not in ("int", "intz") or spec.group is not None:
        return None
    unit = step.detach().float().reshape(-1)
    return unit / 2 if spec.fmt.kind == "int" else unit


def quantized_backward_matmul(a: torch.Tensor, b: torch.Tensor, recipe: Recipe, a_unit: torch.Tensor | None,
                              b_unit: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
    """``a [..., K] · b [N, K]ᵀ`` with the quantized backward of ``recipe`` (:class:`QuantizedBackwardMatmul`);
    ``a_unit`` has one entry per row of ``a`` flattened. ``seed`` None draws :func:`layer_seed` ``("linear")``."""
    if seed is None:
        seed = layer_seed("linear")
    a2d = a.reshape(-1, a.shape[-1])
    y = QuantizedBackwardMatmul.apply(a2d, b, recipe, a_unit, b_unit, seed)
    return y.reshape(*a.shape[:-1], b.shape[0])

