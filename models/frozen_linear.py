"""The frozen quantized linear layer: fixed grid codes, learnable per-row steps, an optional fixed sparsity mask.

Post-training compression (GPTQ, PV-tuning) chooses the codes of a weight itself, so the result cannot live in a
:class:`~bitlaw.models.quant_linear.QuantLinear`, which re-derives scale and codes from a master weight at every
forward. A :class:`FrozenQuantLinear` holds the codes as they were chosen and is the inference layer of such models,
in memory and in the native export, which stores exactly its tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.quantizers import dequantize, linear_given_operand, round_with_step, unrotate, weight_operand
from ..kernels.recipe import Recipe
from .quant_linear import QuantLinear


class FrozenQuantLinear(nn.Module):
    """``y = Q_in(x) · ŵᵀ (+ bias)`` with ``ŵ = dequantize(codes, step) · mask`` fixed by its codes.

    codes: int16 buffer ``[out, in]``, as :class:`~bitlaw.kernels.quantizers.QuantResult` defines them for
        ``recipe.weight``'s format (the odd integers ``2q+1`` of ``int{b}``, level indices otherwise).
    step:  fp32 parameter ``[out, 1]``, what :func:`~bitlaw.kernels.quantizers.dequantize` multiplies the codes by:
        the level step of the integer grids, the scale of the other grids.
    mask:  bool buffer ``[out, in]`` of the kept entries (None: dense). A pruned entry is 0 whatever its code, which
        a centred grid without a 0 level (QuEST's odd ``int{b}``) needs.
    ``ŵ`` is in the stored domain (rotated when the weight spec rotates); the product follows the recipe exactly as
    training does (:func:`~bitlaw.kernels.quantizers.reference_linear_given_weight`): input quantization, the
    rotation back for the ``rotate_back`` layout, ``ŵ`` as it is for ``layout='rotated'``. With ``capture_grad``
    set, the forward keeps ``ŵ`` in ``captured_values`` with its gradient retained (PV-tuning's V-step).
    """

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                 input_lsq_scale: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 name: str = "linear") -> None:
        super().__init__()
        if codes.dim() != 2 or step.shape != (codes.shape[0], 1) or (mask is not None and mask.shape != codes.shape):
            raise ValueError(f"{name}: codes must be [out, in], step [out, 1] and mask None or [out, in]; got codes "
                             f"{tuple(codes.shape)}, step {tuple(step.shape)}, mask "
                             f"{None if mask is None else tuple(mask.shape)}")
        if not recipe.weight.quantized:
            raise ValueError(f"{name}: a frozen quantized layer needs a quantized weight spec; recipe {recipe.name!r} "
                             f"has weight format={recipe.weight.format!r}")
        self.recipe = recipe
        self.layer_name = name
        self.register_buffer("codes", codes.to(torch.int16))
        self.step = nn.Parameter(step.detach().float().clone())
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.input_lsq_scale = None if input_lsq_scale is None else nn.Parameter(input_lsq_scale.detach().clone())
        self.capture_grad = False
        self.captured_values: torch.Tensor | None = None
        self._operand: torch.Tensor | None = None  # see _cached_operand
        self._operand_key: tuple | None = None

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, name: str = "linear") -> FrozenQuantLinear:
        """The codes and row steps ``layer`` quantizes its current weight to, so the forward is unchanged (bitwise,
        on the reference backend). ValueError for weights whose codes and row steps do not describe them (sparse,
        grouped, with outliers, or not quantized)."""
        spec = layer.recipe.weight
        unsupported = [field for field, used in (("sparsity", spec.sparse), ("group", spec.group is not None),
                                                 ("outliers", spec.outliers > 0)) if used]
        if not spec.quantized or unsupported:
            raise ValueError(f"{name}: a frozen quantized layer needs a quantized weight with one scale per row; "
                             f"recipe {layer.recipe.name!r} has weight format={spec.format!r}"
                             + (f" with {', '.join(unsupported)}" if unsupported else ""))
        res = layer.quantized_weight()
        return cls(res.codes, res.step if res.step is not None else res.scale, layer.recipe, layer.bias,
                   layer.input_lsq_scale, name=name)

    def values(self) -> torch.Tensor:
        """``ŵ`` ``[out, in]`` fp32 in the stored domain, differentiable in ``step``; pruned entries exactly 0."""
        values = dequantize(self.codes, self.step, self.recipe.weight.fmt)
        return values if self.mask is None else values * self.mask

    def dense_weight(self) -> torch.Tensor:
        """``W`` ``[out, in]`` with ``y = x · Wᵀ`` when the input is not quantized: ``ŵ`` rotated back, except for the
        ``rotated`` layout, which multiplies by ``ŵ`` as it is."""
        values = self.values()
        return values if self.recipe.layout == "rotated" else unrotate(values, self.recipe.weight)

    def round_codes(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest of ``target`` (stored domain ``[out, in]``) on the current grid: ``(codes, values)``;
        pruned entries keep their code and value 0."""
        values, codes, _ = round_with_step(target, self.step.detach(), self.recipe.weight.fmt)
        if self.mask is not None:
            codes = torch.where(self.mask, codes, self.codes)
            values = values * self.mask
        return codes, values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` → ``[..., out]`` in ``x.dtype``."""
        if not torch.is_grad_enabled() and not self.capture_grad:
            operand = self._cached_operand()
        else:
            values = self.values()
            if self.capture_grad:
                values.retain_grad()
                self.captured_values = values
            operand = weight_operand(values, self.recipe)
        return linear_given_operand(x, operand, self.recipe, self.bias, self.input_lsq_scale)

    def _cached_operand(self) -> torch.Tensor:
        """:func:`~bitlaw.kernels.quantizers.weight_operand` of the current values, computed again only when the
        codes, steps or mask changed (their tensor versions count every in-place write: optimizer steps, V-steps,
        ``load_state_dict``), so inference skips the dequantization and rotation of every call."""
        key = (self.codes._version, self.step._version, None if self.mask is None else self.mask._version,
               self.codes.data_ptr(), self.step.data_ptr(), self.codes.device)
        if self._operand is None or self._operand_key != key:
            with torch.no_grad():
                self._operand = weight_operand(self.values(), self.recipe)
            self._operand_key = key
        return self._operand

    def extra_repr(self) -> str:
        sparse = "" if self.mask is None else f", sparsity={1 - self.mask.float().mean().item():.3f}"
        return f"out={self.out_features}, in={self.in_features}, recipe={self.recipe.name}{sparse}"


def frozen_layers(model: nn.Module) -> dict[str, FrozenQuantLinear]:
    """``{module name: layer}`` of every :class:`FrozenQuantLinear` in ``model``, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FrozenQuantLinear)}
