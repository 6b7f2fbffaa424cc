"""The recipe: how each tensor role of a linear layer is quantized. Defined once here, used everywhere.

A :class:`TensorSpec` says how one tensor is represented and trained (format, scale rule, gradient rule,
rotation); a :class:`Recipe` gives one spec per role of a linear layer (``weight``, ``input``). Both are
frozen and validated on construction, and round-trip through plain dicts (``to_dict``/``from_dict``), which is
how run records and checkpoints store them. Named presets live only in ``conf/quant/<name>.yaml`` and are
read by :func:`load_recipe`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitlaw.kernels.formats import Format, gaussian_scale, get_format
from bitlaw.kernels.hadamard import DEFAULT_BLOCK, check_block

SCALE_RULES = ("gaussian_rms", "absmax", "lsq")
GRAD_RULES = ("trust", "clip", "ste")
ROTATIONS = ("hadamard", "none")
# QuEST's 1-bit clip mask |x_h| <= s·α: s = 1.30 with the Hadamard rotation, 1.25 without (docs/numerics.md §4).
DEFAULT_CLIP = {"hadamard": 1.30, "none": 1.25}

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor (a weight or a layer input) is quantized.

    Fields:
        format:   number format name (see ``kernels.formats``): int1…int8, int2z…int8z, int2s…int8s, ternary,
                  fp{bits}_e{E}m{M}, bf16.
                  ``bf16`` means no quantization; the other fields are then ignored.
        scale:    ``gaussian_rms`` (α = c_format · RMS(row), QuEST), ``absmax`` (grid max = max|row|),
                  ``lsq`` (one learned scale per tensor, LSQ).
        grad:     ``trust`` (QuEST trust mask: |x_h| ≤ α + half the top gap), ``clip`` (|x_h| ≤ clip · α),
                  ``ste`` (straight-through inside ±α, zero outside).
        clip:     the ``s`` of ``grad=clip``; None picks 1.30 with Hadamard, 1.25 without. Only for ``clip``.
        rotation: ``hadamard`` (block Hadamard along the reduction dimension) or ``none``.
        block:    Hadamard block size, a power of two dividing ``in_features``.
    """

    format: str = "bf16"
    scale: str = "gaussian_rms"
    grad: str = "trust"
    clip: float | None = None
    rotation: str = "hadamard"
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        try:
            # Kept on the instance (not a field): the format is looked up once, not at every use, which also keeps
            # torch.compile from tracing into get_format's cache.
            object.__setattr__(self, "_format", get_format(self.format))
        except ValueError as err:
            raise ValueError(f"format={self.format!r}: {err}") from None
        _choice("scale", self.scale, SCALE_RULES)
        _choice("grad", self.grad, GRAD_RULES)
        _choice("rotation", self.rotation, ROTATIONS)
        try:
            check_block(self.block)
        except ValueError:
            raise ValueError(f"block={self.block!r} is not allowed; allowed: a power of two such as 32, 64, 128, "
                             "256 that divides in_features") from None
        if self.clip is not None:
            if self.grad != "clip":
                raise ValueError(f"clip={self.clip!r} is only allowed with grad='clip' (got grad={self.grad!r})")
            if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
                raise ValueError(f"clip={self.clip!r} is not allowed; allowed: a positive number (1.30 in QuEST)")

    @property
    def fmt(self) -> Format:
        return self._format

    @property
    def gaussian_scale(self) -> float:
        """The MSE-optimal scale of the unit grid for N(0,1) data (``c_b`` for ``int{b}``)."""
        return gaussian_scale(self.format)

    @property
    def quantized(self) -> bool:
        """False for ``bf16``: the tensor is used as it is."""
        return not self.fmt.is_identity

    @property
    def rotated(self) -> bool:
        """True when the tensor is quantized in the Hadamard-rotated domain."""
        return self.quantized and self.rotation == "hadamard"

    @property
    def mask_threshold(self) -> float:
        """The gradient mask keeps ``|x_h| <= mask_threshold · α`` (α = the largest grid level after scaling); the
        negative side of ``int{b}z`` reaches one step further (``kernels.quantizers.mask_bounds``)."""
        fmt = self.fmt
        if self.grad == "trust":
            return 1.0 + fmt.trust_halfgap / fmt.max_level
        if self.grad == "clip":
            return self.clip if self.clip is not None else DEFAULT_CLIP[self.rotation]
        return 1.0

    def check_in_features(self, in_features: int, where: str) -> None:
        """Raise ValueError unless the Hadamard block divides ``in_features`` (``where`` names the tensor)."""
        if self.rotated and in_features % self.block:
            fits = [b for b in (16, 32, 64, 128, 256) if in_features % b == 0]
            hint = f"blocks that divide it: {', '.join(map(str, fits))}" if fits else "no power-of-two block ≥ 16"
            raise ValueError(f"{where}: block={self.block} does not divide in_features={in_features} (the Hadamard "
                             f"rotation needs whole blocks); {hint}, or rotation: none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> TensorSpec:
        """Build from a plain dict; errors are prefixed with ``where`` (e.g. ``weight``)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of {_field_names(cls)}, got {data!r}")
        unknown = sorted(set(data) - set(_field_names(cls)))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(_field_names(cls))}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class Recipe:
    """What each role of a linear layer gets: ``weight`` and ``input`` (activation) specs.

    ``name`` is informational (the preset it came from). Build presets with :func:`load_recipe`.
    """

    name: str = "bf16"
    weight: TensorSpec = field(default_factory=TensorSpec)
    input: TensorSpec = field(default_factory=TensorSpec)

    def __post_init__(self) -> None:
        for role in ("weight", "input"):
            if not isinstance(getattr(self, role), TensorSpec):
                raise ValueError(f"{role}: expected a TensorSpec, got {getattr(self, role)!r}")

    @property
    def quantized(self) -> bool:
        """True when any role is quantized (the layer is not a plain linear)."""
        return self.weight.quantized or self.input.quantized

    def check_in_features(self, in_features: int, layer: str = "linear") -> None:
        """Raise ValueError naming ``layer`` unless every rotated role's block divides ``in_features``."""
        self.weight.check_in_features(in_features, f"{layer} (recipe {self.name!r}, weight)")
        self.input.check_in_features(in_features, f"{layer} (recipe {self.name!r}, input)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight.to_dict(), "input": self.input.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; missing roles default to ``bf16``; unknown keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"recipe: expected a mapping with keys name, weight, input, got {data!r}")
        unknown = sorted(set(data) - {"name", "weight", "input"})
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {unknown}; allowed: name, weight, input")
        name = data.get("name", "custom")
        return cls(
            name=str(name),
            weight=TensorSpec.from_dict(dict(data.get("weight") or {}), f"recipe {name!r}: weight"),
            input=TensorSpec.from_dict(dict(data.get("input") or {}), f"recipe {name!r}: input"),
        )


def recipe_names() -> list[str]:
    """Names of the presets in ``conf/quant/``."""
    return sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))


@functools.cache
def load_recipe(name: str) -> Recipe:
    """The preset ``conf/quant/<name>.yaml`` as a :class:`Recipe` (or a path to such a YAML file)."""
    # PyYAML (a dependency of omegaconf) is imported here so kernels/ stays importable without it.
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "quant" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"quant preset {name!r} not found; allowed: {', '.join(recipe_names())}")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    return Recipe.from_dict(data)
