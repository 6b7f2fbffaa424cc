"""PV-tuning of a quantized model on bitlaw's scalar grids: learn the scales, then move the codes a few at a time.

Method (Malinovskii et al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression"):
a quantized weight is a pair of *discrete* parameters (the codes: which grid level each entry takes) and
*continuous* parameters (here one scale α per row, plus everything left in high precision). Fine-tuning alternates:

- **P-step.** The codes are fixed and the continuous parameters follow the loss gradient (Adam). Three parameter
  groups with their own learning rates: (a) the row scales of the quantized layers (with their biases and a learned
  input scale), (b) the RMSNorm weights, (c) the embeddings, ``lm_head`` and any linear left unquantized.
- **V-step.** The codes move under a linearised model of the loss. With ``ŵ`` the current values of one matrix and
  ``g = ∂loss/∂ŵ``, the target is ``t = ŵ − lr_v · g`` (a gradient step taken in weight space). Rounding ``t`` to the
  nearest level (with the current scales) proposes new codes; each proposed change improves the proximal objective
  ``‖ŵ − t‖²`` by ``(ŵ − t)² − (ŵ' − t)²``, which is ``2·lr_v`` times the linearised loss decrease ``−g·(ŵ' − ŵ)``
  minus the penalty ``(ŵ' − ŵ)²``. Only the ``⌈τ·n⌉`` changes of largest improvement are applied per matrix of
  ``n`` entries: a small ``τ`` keeps the step inside the region where the linearisation holds, which is what lets
  PV-tuning move codes without the straight-through estimator's bias.
- **+STE.** Instead of re-deriving the target from ``ŵ`` at every step, a persistent fp32 target is kept and moved by
  ``−lr_v · g`` each V-step, so gradients too small to flip a code in one step accumulate until they do.

On bitlaw's grids the V-step is exact and cheap: each entry is rounded independently (no codebooks to search), so
with ``τ = 1`` it equals round-to-nearest of the target on the grid. Everything happens in the stored domain (rotated
when ``spec.rotated``): for the ``rotate_back`` layout the weight is ``ŵ·Hᵀ`` with ``H`` orthonormal, so the gradient,
the target and the squared distances there are the weight-space ones rotated, and the ranking is unchanged.

Layers after tuning: :func:`to_pv` replaces each :class:`~bitlaw.models.quant_linear.QuantLinear` by a
:class:`PVLinear`, which stays in the model as its inference layer. A ``QuantLinear`` cannot hold the result: it
re-derives an RMS scale from its master weight at every forward, so learned scales (and codes chosen against them)
would be lost. A ``PVLinear`` computes ``x̂ · dequantize(codes, α)ᵀ`` with the recipe's input quantization applied
live, through the same function as the native export's inference layer.

Calibration batches are token ids ``[B, T]``; the loss is next-token cross-entropy of ``batch[:, :-1]`` against
``batch[:, 1:]``. The caller passes separate training and validation splits to :meth:`PVTuner.tune`, which keeps the
state of lowest validation loss; the test split is never seen here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import nn

from bitlaw.kernels.quantizers import dequantize, grid_step, reference_linear_given_weight, round_to_grid, unrotate
from bitlaw.kernels.recipe import Recipe
from bitlaw.models.llama import RMSNorm
from bitlaw.models.quant_linear import QuantLinear


class PVLinear(nn.Module):
    """A linear layer with fixed grid codes and learned row scales: ``y = Q_in(x) · ŵᵀ (+ bias)``.

    ``codes``: int16 buffer ``[out, in]`` as :class:`~bitlaw.kernels.quantizers.QuantResult` defines them for
    ``recipe.weight``'s format; ``scale``: fp32 parameter α ``[out, 1]`` (the largest level of a row's grid);
    ``ŵ = dequantize(codes, grid_step(α))`` in the stored domain (rotated when the weight spec rotates). The product
    follows the recipe exactly as training does (:func:`~bitlaw.kernels.quantizers.reference_linear_given_weight`):
    input quantization, the rotation back for ``rotate_back``, the rotated weight as it is for ``layout='rotated'``.
    With ``capture_grad`` set, the forward keeps ``ŵ`` in ``captured_values`` with its gradient retained (V-step).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                 input_lsq_scale: torch.Tensor | None = None, name: str = "linear") -> None:
        super().__init__()
        if codes.dim() != 2 or scale.shape != (codes.shape[0], 1):
            raise ValueError(f"{name}: codes must be [out, in] and scale [out, 1]; got codes {tuple(codes.shape)}, "
                             f"scale {tuple(scale.shape)}")
        self.recipe = recipe
        self.layer_name = name
        self.register_buffer("codes", codes.to(torch.int16))
        self.scale = nn.Parameter(scale.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.input_lsq_scale = None if input_lsq_scale is None else nn.Parameter(input_lsq_scale.detach().clone())
        self.capture_grad = False
        self.captured_values: torch.Tensor | None = None

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, name: str = "linear") -> PVLinear:
        """The codes and row scales ``layer`` quantizes its current weight to, so the forward is unchanged (bitwise,
        on the reference backend). ValueError for weights whose codes and row scales do not describe them."""
        spec = layer.recipe.weight
        unsupported = [field for field, used in (("sparsity", spec.sparse), ("group", spec.group is not None),
                                                 ("outliers", spec.outliers > 0)) if used]
        if not spec.quantized or unsupported:
            raise ValueError(f"{name}: PV-tuning needs a quantized weight with one scale per row; recipe "
                             f"{layer.recipe.name!r} has weight format={spec.format!r}"
                             + (f" with {', '.join(unsupported)}" if unsupported else ""))
        res = layer.quantized_weight()
        return cls(res.codes, res.scale, layer.recipe, layer.bias, layer.input_lsq_scale, name)

    def values(self) -> torch.Tensor:
        """``ŵ`` ``[out, in]`` fp32 in the stored domain, differentiable in ``scale``."""
        fmt = self.recipe.weight.fmt
        return dequantize(self.codes, grid_step(self.scale, fmt), fmt)

    def dense_weight(self) -> torch.Tensor:
        """``W`` ``[out, in]`` with ``y = x · Wᵀ`` when the input is not quantized: ``ŵ`` rotated back, except for the
        ``rotated`` layout, which multiplies by ``ŵ`` as it is."""
        values = self.values()
        return values if self.recipe.layout == "rotated" else unrotate(values, self.recipe.weight)

    def round_codes(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest of ``target`` (stored domain ``[out, in]``) on the current grid: ``(codes, values)``."""
        values, codes, _ = round_to_grid(target, self.scale.detach(), self.recipe.weight.fmt)
        return codes, values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` → ``[..., out]`` in ``x.dtype``."""
        values = self.values()
        if self.capture_grad:
            values.retain_grad()
            self.captured_values = values
        return reference_linear_given_weight(x, values, self.recipe, self.bias, self.input_lsq_scale)

    def extra_repr(self) -> str:
        return f"out={self.codes.shape[0]}, in={self.codes.shape[1]}, recipe={self.recipe.name}"


def to_pv(model: nn.Module) -> list[PVLinear]:
    """Replace every :class:`QuantLinear` of ``model`` by a :class:`PVLinear` with the same forward, in place.

    Returns the new layers in module order. ValueError (before any swap) when the model has no quantized layer or a
    layer's weight is not PV-tunable (see :meth:`PVLinear.from_quant_linear`).
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not found:
        raise ValueError(f"to_pv: {type(model).__name__} has no QuantLinear layer (convert it with a quantized "
                         "recipe first)")
    layers = [PVLinear.from_quant_linear(module, name) for name, module in found]
    for (name, _), layer in zip(found, layers, strict=True):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)
    return layers


def v_update(layer: PVLinear, target: torch.Tensor, tau: float) -> int:
    """The V-step of one matrix: move at most ``⌈τ·n⌉`` codes of ``layer`` towards round-to-nearest of ``target``.

    ``target``: stored domain ``[out, in]``. Codes whose rounding differs are ranked by the reduction of the squared
    distance to the target, ``(ŵ − t)² − (ŵ' − t)²``, largest first. Returns the number of codes changed.
    """
    with torch.no_grad():
        current = layer.values()
        proposed_codes, proposed_values = layer.round_codes(target)
        gain = (current - target).square() - (proposed_values - target).square()
        changed = proposed_codes != layer.codes
        budget = math.ceil(tau * changed.numel())
        if int(changed.sum()) <= budget:
            layer.codes.copy_(proposed_codes)
            return int(changed.sum())
        ranked = torch.where(changed, gain, -math.inf).flatten()
        chosen = torch.topk(ranked, budget).indices
        codes = layer.codes.flatten()
        codes[chosen] = proposed_codes.flatten()[chosen]
        return budget


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` ``[B, T]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    return model(batch[:, :-1], batch[:, 1:])[1]


class PVTuner:
    """PV-tuning of ``model`` whose quantized layers are ``layers`` (from :func:`to_pv`).

    ``lr_scale``, ``lr_norm``, ``lr_embed``: Adam learning rates of the three P-step groups (quantization scales and
    biases; RMSNorm weights; embeddings, ``lm_head`` and remaining weights). ``lr_v``: the V-step's step size in weight
    units per unit of gradient. ``tau`` in ``[0, 1]``: the largest fraction of each matrix's codes a V-step changes.
    ``ste``: keep a persistent target per matrix (initialised at ``ŵ``) moved by ``−lr_v·g`` each V-step.
    """

    def __init__(self, model: nn.Module, layers: list[PVLinear], lr_scale: float = 1e-3, lr_norm: float = 1e-3,
                 lr_embed: float = 1e-4, lr_v: float = 1e-2, tau: float = 0.01, ste: bool = False) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"PVTuner: tau={tau!r} must be a fraction in [0, 1]")
        self.model, self.layers, self.lr_v, self.tau, self.ste = model, layers, lr_v, tau, ste
        quant = [p for layer in layers for p in (layer.scale, layer.bias, layer.input_lsq_scale) if p is not None]
        norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
        taken = {id(p) for p in quant + norms}
        rest = [p for p in model.parameters() if id(p) not in taken and p.requires_grad]
        self.optimizer = torch.optim.Adam([{"params": quant, "lr": lr_scale, "name": "scales"},
                                           {"params": norms, "lr": lr_norm, "name": "norms"},
                                           {"params": rest, "lr": lr_embed, "name": "embeddings"}])
        self.targets = [layer.values().detach().clone() for layer in layers] if ste else None

    def p_step(self, batch: torch.Tensor) -> float:
        """One Adam step on the continuous parameters with the codes fixed; returns the loss before the step."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            # The V-step divides by α; a row scale Adam pushed through zero would flip the row's grid.
            for layer in self.layers:
                layer.scale.clamp_(min=torch.finfo(layer.scale.dtype).tiny)
        return loss.item()

    def v_step(self, batch: torch.Tensor) -> float:
        """One V-step on every layer (continuous parameters untouched); returns the loss before the step."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for layer in self.layers:
            layer.capture_grad = True
        try:
            loss = lm_loss(self.model, batch)
            loss.backward()
        finally:
            for layer in self.layers:
                layer.capture_grad = False
        for i, layer in enumerate(self.layers):
            grad = layer.captured_values.grad
            layer.captured_values = None
            if self.targets is not None:
                self.targets[i] -= self.lr_v * grad
                target = self.targets[i]
            else:
                target = layer.values().detach() - self.lr_v * grad
            v_update(layer, target, self.tau)
        # The backward also filled the continuous parameters' gradients; no optimizer step consumes them here.
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> float:
        """Mean next-token loss over ``batches``, weighted by their target-token counts."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            targets = batch[:, 1:].numel()
            total += lm_loss(self.model, batch).item() * targets
            count += targets
        if count == 0:
            raise ValueError("PVTuner.evaluate: the batches hold no target token")
        return total / count

    def tune(self, train_batches: Iterable[torch.Tensor], val_batches: list[torch.Tensor], steps: int,
             mode: str = "pv") -> dict:
        """``steps`` steps over ``train_batches`` (cycled), each a P-step, a V-step, or both (``mode`` ``"p"``,
        ``"v"``, ``"pv"``) on the same batch; the validation loss is measured before the first and after every step.

        The model ends in the state of lowest validation loss (possibly the starting one); the optimizer and +STE
        targets stay as the last step left them. Returns ``{"train_loss": [steps floats], "val_loss": [steps + 1
        floats, index 0 the start], "best_step": int}``.
        """
        if mode not in ("p", "v", "pv"):
            raise ValueError(f"PVTuner.tune: mode={mode!r}; allowed: 'p', 'v', 'pv'")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"PVTuner.tune: steps={steps!r} must be a positive int")
        history = {"train_loss": [], "val_loss": [self.evaluate(val_batches)], "best_step": 0}
        best_state = _snapshot(self.model)
        for step, batch in enumerate(itertools.islice(itertools.cycle(train_batches), steps), start=1):
            losses = [self.p_step(batch)] if "p" in mode else []
            if "v" in mode:
                losses.append(self.v_step(batch))
            history["train_loss"].append(losses[0])
            history["val_loss"].append(self.evaluate(val_batches))
            if history["val_loss"][-1] < history["val_loss"][history["best_step"]]:
                history["best_step"] = step
                best_state = _snapshot(self.model)
        self.model.load_state_dict(best_state)
        return history


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}
