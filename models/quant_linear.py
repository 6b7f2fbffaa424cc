"""The quantized linear layer: a drop-in ``nn.Linear`` whose forward and backward follow a recipe."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bitlaw.kernels.linear import BackendChoice, quantized_linear, select_backend
from bitlaw.kernels.quantizers import rotate
from bitlaw.kernels.recipe import Recipe


class QuantLinear(nn.Linear):
    """``y = Q_in(x) · Q_w(W)ᵀ (+ b)`` with ``Q`` given by ``recipe`` (see ``kernels.quantizers``).

    Holds the same ``weight [out, in]`` (and optional ``bias``) parameters as ``nn.Linear`` in high precision;
    quantization happens on the fly in every forward, so the optimizer updates the master weights. For
    ``scale='lsq'`` roles it owns a learned scale (``weight_lsq_scale`` / ``input_lsq_scale``, shape ``[1]``),
    initialised from the first batch it sees at the Gaussian-optimal scale ``c · RMS`` of that tensor.

    Set ``track_stats = True`` to record the masked fraction of each role's gradient mask in ``stats``
    (``weight_masked_fraction``, ``input_masked_fraction``: 0-dim tensors) on the next forward.

    ``backend`` picks the kernels (see :func:`bitlaw.kernels.linear.select_backend`): ``"auto"``, ``"reference"``,
    ``"triton"``, or None to follow ``$BITLAW_BACKEND`` at each forward. ``last_backend`` is the
    :class:`~bitlaw.kernels.linear.BackendChoice` of the latest forward (None before the first): which path ran
    and, when it was not Triton, why.
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

    def _add_lsq_scales(self, device: torch.device | str | None) -> None:
        for role in ("weight", "input"):
            if getattr(self.recipe, role).scale == "lsq":
                self.register_parameter(f"{role}_lsq_scale",
                                        nn.Parameter(torch.ones(1, device=device, dtype=torch.float32)))
            else:
                setattr(self, f"{role}_lsq_scale", None)
        # Persistent so a resumed run does not re-initialise a learned scale from a new batch.
        self.register_buffer("lsq_initialized", torch.zeros((), dtype=torch.bool, device=device))

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
            spec = getattr(self.recipe, role)
            value = spec.gaussian_scale * rotate(tensor.detach(), spec).square().mean().sqrt()
            if dist.is_available() and dist.is_initialized():
                # Activations differ across DDP ranks; averaging keeps the replicated parameter identical.
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
                value /= dist.get_world_size()
            scale.copy_(value.reshape(1).to(scale.dtype))
        self.lsq_initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` → ``[..., out_features]`` in ``x.dtype``."""
        if (self.weight_lsq_scale is not None or self.input_lsq_scale is not None) and not self.lsq_initialized:
            self._init_lsq(x)
        stats = {} if self.track_stats else None
        self.last_backend = select_backend(self.recipe, x, self.weight, self.backend)
        y = quantized_linear(x, self.weight, self.recipe, self.bias, self.weight_lsq_scale, self.input_lsq_scale,
                             stats, self.last_backend.backend)
        if stats is not None:
            self.stats = stats
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"
