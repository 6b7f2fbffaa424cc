"""The quantized linear layer: a drop-in ``nn.Linear`` whose forward and backward follow a recipe."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.gradients import layer_seed
from ..kernels.linear import (
    BackendChoice,
    group_unsupported_reason,
    quantized_linear,
    quantized_linear_group,
    select_backend,
)
from ..kernels.quantizers import QuantResult, initial_lsq_scale, quantize
from ..kernels.recipe import Recipe
from ..kernels.sparsity import (
    SparseState,
    magnitude_keep,
    rigl_drop_fraction,
    rigl_due,
    rigl_update,
    scheduled_sparsity,
    shrink_mask,
)


class QuantLinear(nn.Linear):
    """``y = Q_in(x) · Q_w(W)ᵀ (+ b)`` with ``Q`` given by ``recipe`` (see ``kernels.quantizers``).

    Holds the same ``weight [out, in]`` (and optional ``bias``) parameters as ``nn.Linear`` in high precision;
    quantization happens on the fly in every forward, so the optimizer updates the master weights. For
    ``scale='lsq'`` / ``'lsq_step'`` roles it owns a learned scale (``weight_lsq_scale`` / ``input_lsq_scale``, shape
    ``[1]``: α for ``lsq``, the step for ``lsq_step``), initialised from the first batch it sees
    (:func:`bitlaw.kernels.quantizers.initial_lsq_scale`).

    Set ``track_stats = True`` to record the masked fraction of each role's gradient mask in ``stats``
    (``weight_masked_fraction``, ``input_masked_fraction``: 0-dim tensors) on the next forward.

    ``backend`` picks the kernels (see :func:`bitlaw.kernels.linear.select_backend`): ``"auto"``, ``"reference"``,
    ``"triton"``, or None to follow ``$BITLAW_BACKEND`` at each forward. ``last_backend`` is the
    :class:`~bitlaw.kernels.linear.BackendChoice` of the latest forward (None before the first): which path ran
    and, when it was not Triton, why.

    A sparse weight (``recipe.weight.sparse``, docs/numerics.md §7) follows the training progress: the trainer calls
    :meth:`set_progress` before every training step (the ``progress`` buffer: step, total steps; step -1, the
    default, means outside training, where the final sparsity applies) and :meth:`update_sparsity` after every
    optimizer step. ``sparse_rule='rigl'`` keeps its persistent mask in the ``rigl_mask`` buffer ``[out, in]``
    (bool, saved in checkpoints), initialised at the first forward from the weight's magnitudes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, recipe: Recipe,
                 name: str = "linear", device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        recipe.check_in_features(in_features, name)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.layer_name = name
        self.track_stats = False
        self.backend: str | None = None
        self.last_backend: BackendChoice | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self._add_lsq_scales(device)
        self._add_sparsity_state(device)

    def _add_lsq_scales(self, device: torch.device | str | None) -> None:
        for role in ("weight", "input"):
            if getattr(self.recipe, role).learned_scale:
                self.register_parameter(f"{role}_lsq_scale",
                                        nn.Parameter(torch.ones(1, device=device, dtype=torch.float32)))
            else:
                setattr(self, f"{role}_lsq_scale", None)
        # Persistent so a resumed run does not re-initialise a learned scale from a new batch.
        self.register_buffer("lsq_initialized", torch.zeros((), dtype=torch.bool, device=device))

    def _add_sparsity_state(self, device: torch.device | str | None) -> None:
        # A buffer, so a compiled forward reads the step as data instead of specialising on every value; not saved,
        # as every training step sets it.
        self.register_buffer("progress", torch.tensor([-1, 1], device=device), persistent=False)
        spec = self.recipe.weight
        if spec.sparse and spec.sparse_rule == "rigl":
            # Saved, so a resumed run continues with the same mask (and does not initialise it again).
            self.register_buffer("rigl_mask", torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                                                          device=device))
            self.register_buffer("rigl_initialized", torch.zeros((), dtype=torch.bool, device=device))
        else:
            self.rigl_mask = self.rigl_initialized = None
        self._dense_grad: dict | None = None  # RigL's gradient sink during an update step (set_progress)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, name: str = "linear") -> QuantLinear:
        """A QuantLinear sharing ``linear``'s parameter objects (no copy; works on the meta device)."""
        device = linear.weight.device
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, recipe=recipe,
                        name=name)
        layer.weight = linear.weight
        layer.bias = linear.bias
        if device.type != "meta":
            for role in ("weight", "input"):
                if getattr(layer, f"{role}_lsq_scale") is not None:
                    setattr(layer, f"{role}_lsq_scale", nn.Parameter(torch.ones(1, device=device)))
            layer.lsq_initialized = torch.zeros((), dtype=torch.bool, device=device)
            layer.progress = torch.tensor([-1, 1], device=device)
            if layer.rigl_mask is not None:
                layer.rigl_mask = torch.zeros_like(layer.rigl_mask, device=device)
                layer.rigl_initialized = torch.zeros((), dtype=torch.bool, device=device)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias (LSQ scales are dropped)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    @torch.no_grad()
    def _init_lsq(self, x: torch.Tensor) -> None:
        for role, tensor in (("weight", self.weight), ("input", x)):
            scale = getattr(self, f"{role}_lsq_scale")
            if scale is None:
                continue
            value = initial_lsq_scale(tensor, getattr(self.recipe, role))
            if dist.is_available() and dist.is_initialized():
                # Activations differ across DDP ranks; averaging keeps the replicated parameter identical.
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
                value /= dist.get_world_size()
            scale.copy_(value.reshape(1).to(scale.dtype))
        self.lsq_initialized.fill_(True)

    def weight_decayed_scales(self) -> list[nn.Parameter]:
        """The learned scales that take the linear weights' weight decay: the step of ``lsq_step`` roles (QuEST's
        LSQ keeps it in the decayed group); ``lsq`` scales are not decayed."""
        return [getattr(self, f"{role}_lsq_scale") for role in ("weight", "input")
                if getattr(self.recipe, role).quantized and getattr(self.recipe, role).scale == "lsq_step"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` → ``[..., out_features]`` in ``x.dtype``."""
        if (self.weight_lsq_scale is not None or self.input_lsq_scale is not None) and not self.lsq_initialized:
            self._init_lsq(x)
        stats = {} if self.track_stats else None
        self.last_backend = select_backend(self.recipe, x, self.weight, self.backend)
        # A quantized backward's random bits are keyed by this layer's name (and the trainer's noise context).
        y = quantized_linear(x, self.weight, self.recipe, self.bias, self.weight_lsq_scale, self.input_lsq_scale,
                             stats, self.last_backend.backend, self._weight_sparse(), self.grad_seed())
        if stats is not None:
            self.stats = stats
        return y

    def grad_seed(self) -> torch.Tensor | None:
        """The seed of this call's quantized backward, keyed by the layer's name (and the trainer's noise context);
        None without a quantized backward or outside autograd."""
        if self.recipe.quantized_backward and torch.is_grad_enabled():
            return layer_seed(self.layer_name)
        return None

    def _weight_sparse(self) -> SparseState | None:
        """The weight's sparsity state for this forward; None when the weight is not sparse."""
        spec = self.recipe.weight
        if not spec.sparse:
            return None
        if self.rigl_mask is not None and not self.rigl_initialized:
            self._init_rigl_mask()
        return SparseState(sparsity=scheduled_sparsity(spec, self.progress), keep=self.rigl_mask,
                           grad_sink=self._dense_grad if self.training else None)

    @torch.no_grad()
    def _init_rigl_mask(self) -> None:
        # The top-k of the weight's magnitudes: on a randomly initialised weight, the random sparse topology RigL
        # starts from, without drawing random numbers.
        spec = self.recipe.weight
        sparsity = scheduled_sparsity(spec, self.progress)
        self.rigl_mask.copy_(magnitude_keep(self.weight, spec.structure,
                                            spec.sparsity if sparsity is None else sparsity))
        self.rigl_initialized.fill_(True)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Before training step ``step`` (0-based) of ``total_steps``: the sparsity schedule follows it, and on RigL's
        update steps (:func:`~bitlaw.kernels.sparsity.rigl_due`) the backward collects the dense weight gradient,
        summed over the micro-batches of the step, for :meth:`update_sparsity`."""
        self.progress.copy_(torch.tensor([step, total_steps]))
        if self.rigl_mask is not None and self._dense_grad is None and rigl_due(self.recipe.weight, step,
                                                                                total_steps):
            self._dense_grad = {}

    @torch.no_grad()
    def update_sparsity(self) -> None:
        """After the optimizer step of the step given to :meth:`set_progress`. RigL: the drop/grow update when one
        is due (grown weights set to 0, as in Evci et al.), then the mask pruned down to the schedule's sparsity of
        the next step. Other rules recompute their mask at every forward: nothing to do."""
        if self.rigl_mask is None:
            return
        spec = self.recipe.weight
        step, total = self.progress.tolist()
        mask = self.rigl_mask
        if self._dense_grad:
            dense_grad = self._dense_grad["dense_grad"]
            if dist.is_available() and dist.is_initialized():
                # Ranks saw different data; the summed gradient keeps the replicated masks identical.
                dist.all_reduce(dense_grad, op=dist.ReduceOp.SUM)
            mask = rigl_update(mask, self.weight, dense_grad, rigl_drop_fraction(spec, step, total), spec.structure)
            self.weight.masked_fill_(mask & ~self.rigl_mask, 0.0)
        self._dense_grad = None
        upcoming = scheduled_sparsity(spec, torch.tensor([step + 1, total]))
        if upcoming is not None:
            mask = shrink_mask(mask, self.weight, upcoming, spec.structure)
        self.rigl_mask.copy_(mask)

    @torch.no_grad()
    def quantized_weight(self) -> QuantResult:
        """The weight exactly as this layer's forward uses it (:func:`bitlaw.kernels.quantizers.quantize` of the fp32
        weight with the layer's sparsity state; rotated domain when the recipe rotates it), for exports. Requires a
        compressed weight spec."""
        return quantize(self.weight.detach().float(), self.recipe.weight, self.weight_lsq_scale,
                        self._weight_sparse())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


def _shareable(layers: list[nn.Module]) -> bool:
    """Whether ``layers`` can take one quantized input: QuantLinears of one recipe that a group runs (no learned
    scales, no sparsity), no hooks that expect each layer's own call, no statistics to track, biases on all or
    none."""
    first = layers[0]
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        return False
    # A layer tracking its mask statistics needs its own weight's fraction: on those steps the layers run alone.
    if any(layer.recipe != first.recipe or layer.backend != first.backend or layer._forward_hooks
           or layer._forward_pre_hooks or layer.track_stats for layer in layers):
        return False
    if len({layer.bias is None for layer in layers}) != 1:
        return False
    return group_unsupported_reason(first.recipe) is None


def shared_input_projections(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` with ONE quantization of ``x`` when the layers allow it (q, k and v of an
    attention layer; gate and up of a SwiGLU): one GEMM against their weights' codes, one output split into views
    ``[..., out_i]``. The forward equals the separate layers' (each weight is quantized per row); the backward is
    that of one layer with the concatenated weight (a quantized backward's random bits keyed by the first layer's
    name). Parameters stay the layers' own, so checkpoints and exports are unchanged. Layers that cannot share
    (plain ``nn.Linear``, learned scales, sparsity, hooks, statistics tracking, different recipes) run one by
    one."""
    if len(layers) == 1 or not _shareable(layers):
        return [layer(x) for layer in layers]
    first = layers[0]
    choice = select_backend(first.recipe, x, first.weight, first.backend)
    biases = None if first.bias is None else [layer.bias for layer in layers]
    outputs = quantized_linear_group(x, [layer.weight for layer in layers], first.recipe, biases,
                                     backend=choice.backend, grad_seed=first.grad_seed())
    for layer in layers:
        layer.last_backend = choice
    return outputs
