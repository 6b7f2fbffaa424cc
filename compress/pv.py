"""PV-tuning of a quantized model on bitlaw's scalar grids: learn the scales, then move the codes a few at a time.

Method (Malinovskii et al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression"):
a quantized weight is a pair of *discrete* parameters (the codes: which grid level each entry takes) and
*continuous* parameters (here one step per row, plus everything left in high precision). Fine-tuning alternates:

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
:class:`~bitlaw.models.frozen_linear.FrozenQuantLinear`, which stays in the model as its inference layer (and is what
the native export stores). A ``QuantLinear`` cannot hold the result: it re-derives an RMS scale from its master weight
at every forward, so learned steps (and codes chosen against them) would be lost. The P-step learns the row step
``dequantize`` multiplies the codes by (the level step of the integer grids, the scale of the others): a fixed
multiple of the row scale α, so the learned quantity is the same.

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

from ..models.frozen_linear import FrozenQuantLinear
from ..models.llama import RMSNorm
from ..models.quant_linear import QuantLinear


def to_pv(model: nn.Module) -> list[FrozenQuantLinear]:
    """The layers PV-tuning moves: every :class:`QuantLinear` of ``model`` replaced in place by a
    :class:`~bitlaw.models.frozen_linear.FrozenQuantLinear` with the same forward, and the frozen layers already
    there (from GPTQ), all in module order.

    ValueError (before any swap) when the model has no quantized layer or a layer's weight is not PV-tunable (see
    :meth:`FrozenQuantLinear.from_quant_linear`).
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear | FrozenQuantLinear)]
    if not found:
        raise ValueError(f"to_pv: {type(model).__name__} has no QuantLinear or FrozenQuantLinear layer (convert it "
                         "with a quantized recipe, or quantize it by GPTQ, first)")
    swaps = {name: FrozenQuantLinear.from_quant_linear(module, name) for name, module in found
             if isinstance(module, QuantLinear)}
    for name, layer in swaps.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)
    return [swaps.get(name, module) for name, module in found]


def v_update(layer: FrozenQuantLinear, target: torch.Tensor, tau: float) -> int:
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

    ``lr_scale``, ``lr_norm``, ``lr_embed``: Adam learning rates of the three P-step groups (quantization steps and
    biases; RMSNorm weights; embeddings, ``lm_head`` and remaining weights). ``lr_v``: the V-step's step size in weight
    units per unit of gradient. ``tau`` in ``[0, 1]``: the largest fraction of each matrix's codes a V-step changes.
    ``ste``: keep a persistent target per matrix (initialised at ``ŵ``) moved by ``−lr_v·g`` each V-step.
    """

    def __init__(self, model: nn.Module, layers: list[FrozenQuantLinear], lr_scale: float = 1e-3, lr_norm: float = 1e-3,
                 lr_embed: float = 1e-4, lr_v: float = 1e-2, tau: float = 0.01, ste: bool = False) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"PVTuner: tau={tau!r} must be a fraction in [0, 1]")
        self.model, self.layers, self.lr_v, self.tau, self.ste = model, layers, lr_v, tau, ste
        quant = [p for layer in layers for p in (layer.step, layer.bias, layer.input_lsq_scale) if p is not None]
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
            # Rounding divides by the step; a step Adam pushed through zero would flip the row's grid.
            for layer in self.layers:
                layer.step.clamp_(min=torch.finfo(layer.step.dtype).tiny)
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
             mode: str = "pv", eval_every: int = 1) -> dict:
        """``steps`` steps over ``train_batches`` (cycled), each a P-step, a V-step, or both (``mode`` ``"p"``,
        ``"v"``, ``"pv"``) on the same batch; the validation loss is measured before the first step, after every
        ``eval_every``-th step and after the last.

        The model ends in the evaluated state of lowest validation loss (possibly the starting one); the optimizer
        and +STE targets stay as the last step left them. Returns ``{"train_loss": [steps floats], "val_steps":
        [steps evaluated, 0 the start], "val_loss": [their losses], "best_step": int}``.
        """
        if mode not in ("p", "v", "pv"):
            raise ValueError(f"PVTuner.tune: mode={mode!r}; allowed: 'p', 'v', 'pv'")
        for name, value in (("steps", steps), ("eval_every", eval_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PVTuner.tune: {name}={value!r} must be a positive int")
        history = {"train_loss": [], "val_steps": [0], "val_loss": [self.evaluate(val_batches)], "best_step": 0}
        best_loss, best_state = history["val_loss"][0], _snapshot(self.model)
        for step, batch in enumerate(itertools.islice(itertools.cycle(train_batches), steps), start=1):
            losses = [self.p_step(batch)] if "p" in mode else []
            if "v" in mode:
                losses.append(self.v_step(batch))
            history["train_loss"].append(losses[0])
            if step % eval_every and step != steps:
                continue
            history["val_steps"].append(step)
            history["val_loss"].append(self.evaluate(val_batches))
            if history["val_loss"][-1] < best_loss:
                best_loss, history["best_step"], best_state = history["val_loss"][-1], step, _snapshot(self.model)
        self.model.load_state_dict(best_state)
        return history


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}
