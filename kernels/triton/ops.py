"""The fused quantized linear as PyTorch custom operators (``torch.library``), with their autograd formulas.

Registered as operators, the Triton path is one opaque node to ``torch.compile``: a compiled model keeps one graph
through every quantized layer instead of breaking it around each kernel launch. Each operator has a fake (meta)
implementation giving output shapes and dtypes, so tracing needs no real kernels.

- ``bitlaw::quantized_linear``: both roles quantized; ``x [M, K]`` (fp32/bf16), one to three weights
  ``[N_i, K]`` (read in their own dtype, the fp32 master weights, once), optional ``bias [ΣN_i]`` →
  ``y [M, ΣN_i]`` in ``x``'s dtype, plus the packed codes, steps and bit masks of both roles that backward keeps (no
  activation tensor). Several weights make one GEMM against one quantization of ``x`` (q, k and v share their
  input): the weights are quantized row by row, so this equals the layer of the concatenated weight. The GEMM is
  the vendor's (:mod:`bitlaw.kernels.triton.vendor`): fp8 e4m3 codes into ``torch._scaled_mm`` with both row
  steps in its epilogue.
- ``bitlaw::quantized_linear_backward``: the gradients of docs/numerics.md §4 (:mod:`bitlaw.kernels.triton.backward`);
  with a quantized backward (the recipe's ``grad_input`` / ``grad_weight``, docs/numerics.md §8) those GEMMs take
  the 8-bit gradient of :mod:`bitlaw.kernels.triton.grad_gemm` on the vendor GEMMs, seeded by the forward's ``seed``
  tensor.
- ``bitlaw::quantized_weight``: weight-only recipes; ``Q(w·H)·Hᵀ`` (``Q(w·H)`` for ``layout='rotated'``) in fp32
  and the mask.

The recipe travels as its JSON text (operators take plain types only). Annotations are evaluated at definition (no
``from __future__ import annotations``): torch.library reads them to build each operator's schema.
"""

import functools
import json
from typing import Optional

import torch

from ..hadamard import block_hadamard
from ..packing import field_bits, unpack_mask
from ..recipe import Recipe
from .backward import dequantize_rows, grad_input, grad_weight
from .grad_gemm import quantize_gradient, quantized_grad_gemm
from .quant import QuantizedRows, code_dtype, quantize_row_groups, quantize_rows
from .vendor import scaled_matmul

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_GROUP = 3  # weights one quantized_linear call multiplies against one quantized input (q, k, v)


@functools.cache
def recipe_of(text: str) -> Recipe:
    """The :class:`Recipe` of its JSON text (cached: every layer of a model shares one)."""
    return Recipe.from_dict(json.loads(text))


@torch.compiler.assume_constant_result  # a compiled graph evaluates it once, at trace time
def recipe_text(recipe: Recipe) -> str:
    """The JSON text an operator takes for ``recipe``."""
    return json.dumps(recipe.to_dict(), sort_keys=True)


def _empty_like_rows(rows: int, k: int, bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    packed = torch.empty(rows, -(-k * field_bits(2**bits) // 8), dtype=torch.uint8, device=device)
    return packed, torch.empty(rows, dtype=torch.float32, device=device), \
        torch.empty(rows, -(-k // 8), dtype=torch.uint8, device=device)


@torch.library.custom_op("bitlaw::quantized_linear", mutates_args=())
def quantized_linear_op(x: torch.Tensor, weight: torch.Tensor, weight2: Optional[torch.Tensor],  # noqa: UP045
                        weight3: Optional[torch.Tensor], bias: Optional[torch.Tensor], recipe: str,  # noqa: UP045
                        seed: Optional[torch.Tensor] = None  # noqa: UP045
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """``(y, x_packed, x_step, x_mask, w_packed, w_step, w_mask)``, the weight role's rows those of ``weight``,
    ``weight2`` and ``weight3`` (the ones given) in order; see the module docstring. ``seed``: a 0-dim int64 tensor
    keying a stochastic backward's bits (unused otherwise). Up to three weights as separate arguments, not a
    ``Tensor[]``: torch 2.13's autograd wrapper of custom operators miscounts the gradients of a tensor list."""
    spec = recipe_of(recipe)
    # Both operands' codes in one dtype: fp8 when both grids are e4m3-exact, else int8.
    int8 = torch.int8 in (code_dtype(spec.input.fmt.bits), code_dtype(spec.weight.fmt.bits))
    xq = quantize_rows(x, spec.input, codes=True, packed=True, int8=int8)
    wq = quantize_row_groups(_given(weight, weight2, weight3), spec.weight, codes=True, packed=True, int8=int8)
    y = scaled_matmul(xq.codes, xq.step * 0.5, wq.codes, wq.step * 0.5, x.dtype, bias)
    return y, xq.packed, xq.step, xq.mask, wq.packed, wq.step, wq.mask


def _given(*weights: torch.Tensor | None) -> list[torch.Tensor]:
    return [w for w in weights if w is not None]


@quantized_linear_op.register_fake
def _(x, weight, weight2, weight3, bias, recipe, seed=None):
    spec = recipe_of(recipe)
    n = sum(w.shape[0] for w in _given(weight, weight2, weight3))
    y = x.new_empty(x.shape[0], n)
    return (y, *_empty_like_rows(x.shape[0], x.shape[1], spec.input.fmt.bits, x.device),
            *_empty_like_rows(n, x.shape[1], spec.weight.fmt.bits, x.device))


@torch.library.custom_op("bitlaw::quantized_linear_backward", mutates_args=())
def quantized_linear_backward_op(grad_y: torch.Tensor, x_packed: torch.Tensor, x_step: torch.Tensor,
                                 x_mask: torch.Tensor, w_packed: torch.Tensor, w_step: torch.Tensor,
                                 w_mask: torch.Tensor, recipe: str, k: int, x_dtype: torch.dtype,
                                 w_dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x [M, K] in x_dtype, grad_w [N, K] in w_dtype)`` from the saved rows of both roles; ``seed`` keys a
    stochastic backward's bits."""
    spec = recipe_of(recipe)
    xq = QuantizedRows(None, x_packed, x_step, x_mask, k, spec.input.fmt.bits, spec.input.rotated)
    wq = QuantizedRows(None, w_packed, w_step, w_mask, k, spec.weight.fmt.bits, spec.weight.rotated)
    grad_y = grad_y.contiguous()
    if grad_y.dtype not in _KERNEL_DTYPES:
        grad_y = grad_y.float()
    if not spec.quantized_backward:
        return grad_input(grad_y, xq, wq, out_dtype=x_dtype), grad_weight(grad_y, xq, wq, out_dtype=w_dtype)
    quant_in, quant_w = quantize_gradient(grad_y, xq, wq, spec.grad_input, spec.grad_weight, seed)
    if quant_in is None:
        grad_x = grad_input(grad_y, xq, wq, out_dtype=x_dtype)
    else:
        grad_x = quantized_grad_gemm(quant_in, wq, xq, x_dtype, grad_y.dtype)
    if quant_w is None:
        grad_w = grad_weight(grad_y, xq, wq, out_dtype=w_dtype)
    else:
        grad_w = quantized_grad_gemm(quant_w, xq, wq, w_dtype, grad_y.dtype)
    return grad_x, grad_w


@quantized_linear_backward_op.register_fake
def _(grad_y, x_packed, x_step, x_mask, w_packed, w_step, w_mask, recipe, k, x_dtype, w_dtype, seed=0):
    return (grad_y.new_empty(x_step.shape[0], k, dtype=x_dtype),
            grad_y.new_empty(w_step.shape[0], k, dtype=w_dtype))


def _setup_linear(ctx, inputs, output):
    x, weight, weight2, weight3, bias, recipe, seed = inputs
    weights = _given(weight, weight2, weight3)
    ctx.save_for_backward(*output[1:])
    ctx.recipe, ctx.k = recipe, x.shape[1]
    ctx.seed = 0 if seed is None else int(seed)
    ctx.rows = [w.shape[0] for w in weights]
    ctx.dtypes = (x.dtype, weights[0].dtype, None if bias is None else bias.dtype)


def _backward_linear(ctx, grad_y, *unused):
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_x, grad_w = quantized_linear_backward_op(grad_y, *ctx.saved_tensors, ctx.recipe, ctx.k, x_dtype, w_dtype,
                                                  ctx.seed)
    grad_b = grad_y.float().sum(dim=0).to(b_dtype) if ctx.needs_input_grad[4] else None
    grads_w = list(grad_w.split(ctx.rows)) + [None] * (3 - len(ctx.rows))
    return grad_x, *grads_w, grad_b, None, None


quantized_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)


@torch.library.custom_op("bitlaw::quantized_weight", mutates_args=())
def quantized_weight_op(weight: torch.Tensor, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(w·H)·Hᵀ fp32 [N, K], bit mask [N, ceil(K/8)])`` for the weight role of ``recipe`` (weight-only recipes);
    ``Q(w·H)`` itself, not rotated back, for ``layout='rotated'``."""
    spec = recipe_of(recipe)
    wq = quantize_rows(weight, spec.weight, codes=False, packed=True)
    return dequantize_rows(wq, torch.float32, unrotate=spec.layout == "rotate_back"), wq.mask


@quantized_weight_op.register_fake
def _(weight, recipe):
    return weight.new_empty(weight.shape, dtype=torch.float32), \
        weight.new_empty(weight.shape[0], -(-weight.shape[1] // 8), dtype=torch.uint8)


def _setup_weight(ctx, inputs, output):
    weight, recipe = inputs
    spec = recipe_of(recipe)
    ctx.save_for_backward(output[1])
    ctx.k, ctx.rotated, ctx.dtype = weight.shape[1], spec.weight.rotated, weight.dtype
    ctx.rotated_back = spec.weight.rotated and spec.layout == "rotate_back"


def _backward_weight(ctx, grad, unused):
    (mask,) = ctx.saved_tensors
    keep = unpack_mask(mask, ctx.k)
    # The rotate-back is ŵ_h·H, whose adjoint is ·H again (absent in layout 'rotated', which uses ŵ_h itself); then
    # the trust mask and the inverse rotation.
    grad = block_hadamard(grad) if ctx.rotated_back else grad.float()
    grad = grad * keep
    grad = block_hadamard(grad) if ctx.rotated else grad
    return grad.to(ctx.dtype), None


quantized_weight_op.register_autograd(_backward_weight, setup_context=_setup_weight)
