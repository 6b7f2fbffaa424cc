"""``RecipeConverter``: applies a recipe to a model and keeps its quantized layers' per-step bookkeeping.

In the shape of torchtitan's model converters (an object with ``convert(model)`` and ``post_optimizer_hook(model)``),
with the hooks a quantization-aware run needs besides: the sparsity progress before each training step, sampling of
the gradient masks' masked fractions, and which kernel path each kind of layer took.
"""

from __future__ import annotations

import re

from torch import nn

from ..kernels.linear import BACKENDS
from ..kernels.recipe import Recipe
from .convert import BLOCK_PROJECTIONS, LayerFilter, convert, layer_matcher, quantized_layers

# A layer's kind is its name without the block index: every block's q_proj is one kind.
_BLOCK_PREFIX = re.compile(r"^layers\.\d+\.")


class RecipeConverter:
    """Converts a model's linear layers to follow ``recipe`` and drives those layers through training.

    ``layer_filter`` selects the layers as in :func:`~bitlaw.models.convert.convert` (default: the block
    projections); ``backend`` (``"auto"``, ``"reference"``, ``"triton"``, or None to follow ``$BITLAW_BACKEND``)
    is given to every converted layer (``QuantLinear.backend``).

    The hooks act on every :class:`~bitlaw.models.quant_linear.QuantLinear` of the model they are given, and are
    called by the trainer in this order:

    - :meth:`convert` once, after the model is built and before the optimizer exists: swaps the selected layers
      (in place, reusing the parameters, idempotent) and sets their ``backend``.
    - :meth:`pre_step_hook` before each training step's forward, with the step (0-based) and the run's total steps:
      each layer with a sparse weight gets its ``progress`` (the cubic schedule follows it; on RigL's update steps
      the backward collects the dense weight gradient, summed over the step's micro-batches).
    - :meth:`post_optimizer_hook` after each optimizer step (once, however many micro-batches): RigL's drop/grow
      when due, which rewrites ``rigl_mask`` and zeroes the grown weights, then the mask pruned to the next step's
      scheduled sparsity. Other sparsity rules recompute their mask at every forward: nothing happens.
    - :meth:`track_masks` ``(model, True)`` before a forward whose masked fractions are wanted, :meth:`masked_fractions`
      after it, then :meth:`track_masks` ``(model, False)``: they set and read ``track_stats`` / ``stats``.
    - :meth:`record_backends` after a forward: notes which path each kind of layer took (kept for
      :meth:`backend_report`, which mutates nothing).

    The converter holds no tensors and no reference to the model; its only state is the backend report.
    """

    def __init__(self, recipe: Recipe, layer_filter: LayerFilter = BLOCK_PROJECTIONS, backend: str | None = None):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"RecipeConverter: backend={backend!r} is not allowed; allowed: {', '.join(BACKENDS)} "
                             f"or None (follow $BITLAW_BACKEND)")
        self.recipe = recipe
        self.layer_filter = layer_filter
        self.backend = backend
        self._backends: dict[str, dict[str, str | None]] = {}

    def convert(self, model: nn.Module) -> nn.Module:
        """:func:`~bitlaw.models.convert.convert` ``(model, recipe, layer_filter)``, then ``backend`` on each
        selected layer that is quantized. In place and idempotent; returns ``model``. Raises what ``convert``
        raises (a filter that selects nothing, a width the recipe's blocks or groups do not divide)."""
        convert(model, self.recipe, self.layer_filter)
        match = layer_matcher(self.layer_filter)
        for name, layer in quantized_layers(model).items():
            if match(name, layer):
                layer.backend = self.backend
        return model

    def pre_step_hook(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Before training step ``step`` (0-based) of ``total_steps``: ``QuantLinear.set_progress`` on every layer
        whose weight is sparse (none: nothing happens)."""
        for layer in quantized_layers(model).values():
            if layer.recipe.weight.sparse:
                layer.set_progress(step, total_steps)

    def post_optimizer_hook(self, model: nn.Module) -> None:
        """After each optimizer step, on the updated weights: ``QuantLinear.update_sparsity`` on every layer whose
        weight is sparse (RigL's update of ``rigl_mask`` and the grown weights)."""
        for layer in quantized_layers(model).values():
            if layer.recipe.weight.sparse:
                layer.update_sparsity()

    def track_masks(self, model: nn.Module, on: bool) -> None:
        """Switch the recording of each quantized layer's gradient-mask masked fractions on or off (``track_stats``);
        the next forward records them."""
        for layer in quantized_layers(model).values():
            layer.track_stats = on

    def masked_fractions(self, model: nn.Module) -> dict[str, float]:
        """``{"mask/<layer name>.<role>": fraction}`` (role ``weight`` or ``input``) of the latest forward, for each
        layer that is tracking (:meth:`track_masks`); empty when none is."""
        return {f"mask/{name}.{key.removesuffix('_masked_fraction')}": float(value)
                for name, layer in quantized_layers(model).items() if layer.track_stats
                for key, value in layer.stats.items()}

    def record_backends(self, model: nn.Module) -> dict[str, float]:
        """Note which path each kind of quantized layer (its name without ``layers.<i>.``) took in its latest
        forward, and return ``{"backend/<kind>": fraction of that kind's distinct (path, reason) choices on
        Triton}``. Layers that have not run a forward are left out; kinds seen before and not now keep their
        entry in :meth:`backend_report`."""
        kinds: dict[str, set[tuple[str, str | None]]] = {}
        for name, layer in quantized_layers(model).items():
            if layer.last_backend is not None:
                kind = _BLOCK_PREFIX.sub("", name)
                kinds.setdefault(kind, set()).add((layer.last_backend.backend, layer.last_backend.reason))
        metrics: dict[str, float] = {}
        for kind, choices in kinds.items():
            backends = sorted({backend for backend, _ in choices})
            reasons = sorted({reason for _, reason in choices if reason})
            self._backends[kind] = {"backend": backends[0] if len(backends) == 1 else "mixed",
                                    "reason": "; ".join(reasons) or None}
            metrics[f"backend/{kind}"] = sum(backend == "triton" for backend, _ in choices) / len(choices)
        return metrics

    def backend_report(self) -> dict[str, dict[str, str | None]]:
        """``{layer kind (e.g. "self_attn.q_proj"): {"backend": "triton" | "reference" | "mixed", "reason": why not
        Triton or None}}`` as of the latest :meth:`record_backends`; empty before one saw a quantized layer run."""
        return dict(self._backends)
