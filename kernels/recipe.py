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
from typing import Any

from ..core.config import preset_names, read_preset
from .formats import Format, gaussian_scale, get_format
from .hadamard import DEFAULT_BLOCK, check_block
from .sparsity import SCHEDULES, SPARSE_RULES, STRUCTURES, kept_count, parse_nm

SCALE_RULES = ("gaussian_rms", "absmax", "lsq", "lsq_step")
LEARNED_SCALES = ("lsq", "lsq_step")
GRAD_RULES = ("trust", "clip", "ste")
ROTATIONS = ("hadamard", "none")
LAYOUTS = ("rotate_back", "rotated")
# The backward GEMMs' output-gradient formats (docs/numerics.md §8): bf16 leaves the gradient as it is (QuEST).
GRAD_FORMATS = ("bf16", "int8", "fp8_e4m3", "fp8_e5m2")
GRAD_ROUNDINGS = ("nearest", "stochastic")
GRAD_SCALES = ("token", "channel", "block")
GRAD_ROLES = ("grad_input", "grad_weight")
# QuEST's 1-bit clip mask |x_h| <= s·α: s = 1.30 with the Hadamard rotation, 1.25 without (docs/numerics.md §4).
DEFAULT_CLIP = {"hadamard": 1.30, "none": 1.25}

def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor (a weight or a layer input) is quantized.

    Fields:
        format:   number format name (see ``kernels.formats``): int1…int8, int2z…int8z, int2s…int8s, ternary,
                  fp{bits}_e{E}m{M}, bf16.
                  ``bf16`` means no quantization; the quantization fields are then ignored (a sparse ``bf16``
                  spec still prunes).
        scale:    ``gaussian_rms`` (α = c_format · RMS(row), QuEST), ``absmax`` (grid max = max|row|),
                  ``lsq`` (one learned α per tensor, init c_format · RMS, not weight-decayed: bitlaw's LSQ),
                  ``lsq_step`` (one learned step per tensor, init 2·mean|x|/sqrt(Q_P), gradient scale
                  1/sqrt(numel·Q_P) with Q_P = 2^(b-1) - 1, weight-decayed with the linear weights: QuEST's LSQ;
                  centred ``int2`` … ``int8`` only). docs/numerics.md §5.
        grad:     ``trust`` (QuEST trust mask: |x_h| ≤ α + half the top gap), ``clip`` (x_h within ``clip`` times
                  the grid's own range, ±clip · α on symmetric grids), ``ste`` (straight-through: the gradient
                  passes everywhere, no mask).
        clip:     the ``s`` of ``grad=clip``; None picks 1.30 with Hadamard, 1.25 without. Only for ``clip``.
        rotation: ``hadamard`` (block Hadamard along the reduction dimension) or ``none``.
        block:    Hadamard block size, a power of two dividing ``in_features``.

    Sparsity, groups and outliers (docs/numerics.md §7; all off by default, which keeps every older recipe's
    meaning). They act in the stored domain (after the rotation), in the order sparsify → scale → round → outliers:
        sparsity:      fraction in [0, 1) of entries set to exactly zero (top-k by magnitude per unit).
        structure:     ``row`` (per output channel / per token), ``tensor`` (the whole tensor; weights only), or
                       ``N:M`` such as ``2:4`` (keep N of every M consecutive entries along the reduction
                       dimension; ``sparsity`` then stays 0, see :attr:`realised_sparsity`).
        sparse_rule:   ``magnitude`` (top-k recomputed every call, the gradient only to survivors), ``rbbm`` (the
                       same forward, RBBM's banded backward mask), ``rigl`` (a persistent mask updated by drop and
                       grow). ``rbbm`` and ``rigl`` are for weights only, with ``structure`` row or tensor.
        band:          RBBM's p in [0, 0.5) (0 equals ``magnitude``); only with ``rbbm``.
        schedule:      ``constant`` or ``cubic`` (gradual pruning from 0 to ``sparsity``; weights only).
        ramp:          fraction of the training steps over which ``cubic`` ramps up, in (0, 1]; only with cubic.
        update_every:  RigL's steps between mask updates (≥ 1); only with ``rigl``.
        drop_fraction: RigL's initial drop fraction in (0, 1), cosine-decayed; only with ``rigl``.
        rigl_stop:     fraction of the training steps after which RigL's mask stays fixed, in (0, 1].
        group:         entries per scale along the reduction dimension (one scale per row per group; divides
                       ``in_features``); None: one scale per row. Quantized formats with a computed scale only.
        outliers:      fraction in [0, 1) of each row's largest-magnitude survivors kept in bf16, the rest
                       quantized with a scale computed without them. Quantized formats with a computed scale only.
    """

    format: str = "bf16"
    scale: str = "gaussian_rms"
    grad: str = "trust"
    clip: float | None = None
    rotation: str = "hadamard"
    block: int = DEFAULT_BLOCK
    sparsity: float = 0.0
    structure: str = "row"
    sparse_rule: str = "magnitude"
    band: float = 0.0
    schedule: str = "constant"
    ramp: float = 0.5
    update_every: int = 100
    drop_fraction: float = 0.3
    rigl_stop: float = 0.75
    group: int | None = None
    outliers: float = 0.0

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
        if self.quantized and self.scale == "lsq_step" and (self.fmt.kind != "int" or self.fmt.bits < 2):
            raise ValueError(f"scale='lsq_step' is not allowed with format={self.format!r}; allowed: int2 … int8 "
                             "(QuEST's LSQ learns the step of the centred grid; at 1 bit Q_P = 2^(b-1) - 1 is 0)")
        if self.clip is not None:
            if self.grad != "clip":
                raise ValueError(f"clip={self.clip!r} is only allowed with grad='clip' (got grad={self.grad!r})")
            if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
                raise ValueError(f"clip={self.clip!r} is not allowed; allowed: a positive number (1.30 in QuEST)")
        _check_compression(self)

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
    def learned_scale(self) -> bool:
        """True when the scale is a learned parameter (``lsq``: α, ``lsq_step``: the step), not computed per row."""
        return self.quantized and self.scale in LEARNED_SCALES

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M ``structure``, else None."""
        return parse_nm(self.structure)

    @property
    def realised_sparsity(self) -> float:
        """The fraction of zeros: ``1 − N/M`` for N:M, else ``sparsity`` (per unit it is rounded, see
        ``kernels.sparsity``)."""
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def sparse(self) -> bool:
        """True when entries are pruned (any sparsity, N:M included)."""
        return self.realised_sparsity > 0

    @property
    def compressed(self) -> bool:
        """True when the tensor is not used as it is: quantized, or sparse (a sparse ``bf16`` spec included)."""
        return self.quantized or self.sparse

    @property
    def mask_threshold(self) -> float:
        """The gradient mask keeps ``|x_h| <= mask_threshold · α`` (α = the largest grid level after scaling); the
        negative side of ``int{b}z`` reaches further (``kernels.quantizers.mask_bounds``). ``inf`` for ``ste``,
        which masks nothing."""
        fmt = self.fmt
        if self.grad == "trust":
            return 1.0 + fmt.trust_halfgap / fmt.max_level
        if self.grad == "clip":
            return self.clip if self.clip is not None else DEFAULT_CLIP[self.rotation]
        return math.inf

    def check_in_features(self, in_features: int, where: str) -> None:
        """Raise ValueError unless the Hadamard block divides ``in_features`` (``where`` names the tensor)."""
        if self.rotated and in_features % self.block:
            fits = [b for b in (16, 32, 64, 128, 256) if in_features % b == 0]
            hint = f"blocks that divide it: {', '.join(map(str, fits))}" if fits else "no power-of-two block ≥ 16"
            raise ValueError(f"{where}: block={self.block} does not divide in_features={in_features} (the Hadamard "
                             f"rotation needs whole blocks); {hint}, or rotation: none")
        if self.nm and in_features % self.nm[1]:
            raise ValueError(f"{where}: structure={self.structure!r} needs groups of M={self.nm[1]} entries that "
                             f"divide in_features={in_features}")
        if self.group is not None and in_features % self.group:
            fits = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
            raise ValueError(f"{where}: group={self.group} does not divide in_features={in_features} (one scale per "
                             f"{self.group} entries of a row); groups that divide it: {', '.join(map(str, fits))}")

    def storage_bits(self, in_features: int) -> float:
        """Bits per element of a weight ``[rows, in_features]`` (or an input row) stored as this spec says: the
        honest size of the compressed tensor, with its metadata (docs/numerics.md §7).

        Values: the format's bits (16 for ``bf16``); per row one fp32 scale (quantized, computed scales) plus, with
        ``group``, one 16-bit scale per group; each outlier 16 bits plus a ``⌈log2 in_features⌉``-bit position. Only
        survivors store values; their positions cost a 1-bit-per-element bitmap or a position per survivor,
        whichever is smaller (``tensor``: rows differ, so the average survivor count, and each row's count adds
        ``⌈log2(in_features + 1)⌉`` bits to the positions); N:M stores N values per M plus ``⌈log2 C(M, N)⌉`` bits
        naming the pattern. A learned per-tensor scale is not counted.
        """
        k = in_features
        value_bits = self.fmt.bits if self.quantized else 16
        position_bits = math.ceil(math.log2(k)) if k > 1 else 0
        if self.nm:
            n, m = self.nm
            bits = k // m * (n * value_bits + math.ceil(math.log2(math.comb(m, n))))
        elif self.sparse:
            kept = kept_count(k, self.sparsity) if self.structure == "row" else (1 - self.sparsity) * k
            count_bits = math.ceil(math.log2(k + 1)) if self.structure == "tensor" else 0
            bits = kept * value_bits + min(k, kept * position_bits + count_bits)
        else:
            bits = k * value_bits
        if self.quantized and not self.learned_scale:
            bits += 32 + (16 * k // self.group if self.group else 0)
        bits += math.floor(self.outliers * k + 0.5) * (16 + position_bits)
        return bits / k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> TensorSpec:
        """Build from a plain dict; errors are prefixed with ``where`` (e.g. ``weight``)."""
        return _from_fields(cls, data, where)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorSpec)}


def _fraction(name: str, value: Any, allowed: str, low: float, high: float, low_open: bool = False,
              high_open: bool = True) -> None:
    """Raise ValueError unless ``value`` is a real number in the interval (``allowed`` describes it)."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)):
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def _only_with(spec: TensorSpec, name: str, condition: bool, needs: str) -> None:
    """Raise ValueError when field ``name`` differs from its default although ``condition`` (described by ``needs``)
    does not hold: a value that would be silently ignored."""
    value = getattr(spec, name)
    if not condition and value != _DEFAULTS[name]:
        raise ValueError(f"{name}={value!r} is only allowed with {needs}")


def _check_compression(spec: TensorSpec) -> None:
    """Validate the sparsity, group and outlier fields of ``spec`` (docs/numerics.md §7)."""
    _fraction("sparsity", spec.sparsity, "a fraction in [0, 1)", 0.0, 1.0)
    nm = spec.nm
    if spec.structure not in STRUCTURES and not (nm and 1 <= nm[0] < nm[1]):
        # An unquoted 2:4 in YAML 1.1 (PyYAML) is the base-60 integer 124.
        hint = ' (quote it in YAML: "2:4"; unquoted, 2:4 reads as the base-60 number 124)' if isinstance(
            spec.structure, int) else ""
        raise ValueError(f"structure={spec.structure!r} is not allowed; allowed: {', '.join(STRUCTURES)}, or N:M "
                         f"with 1 <= N < M such as 2:4 or 4:8{hint}")
    if nm and spec.sparsity:
        raise ValueError(f"sparsity={spec.sparsity!r} must be 0 with structure={spec.structure!r}: N:M sets the "
                         f"sparsity itself (1 - N/M = {1 - nm[0] / nm[1]:g})")
    _choice("sparse_rule", spec.sparse_rule, SPARSE_RULES)
    _choice("schedule", spec.schedule, SCHEDULES)
    unstructured = spec.sparsity > 0
    if spec.sparse_rule != "magnitude" and not unstructured:
        raise ValueError(f"sparse_rule={spec.sparse_rule!r} needs sparsity > 0 with structure row or tensor (got "
                         f"sparsity={spec.sparsity!r}, structure={spec.structure!r})")
    if spec.schedule != "constant" and not unstructured:
        raise ValueError(f"schedule={spec.schedule!r} needs sparsity > 0 with structure row or tensor (got "
                         f"sparsity={spec.sparsity!r}, structure={spec.structure!r})")
    _fraction("band", spec.band, "a number in [0, 0.5) (RBBM's p)", 0.0, 0.5)
    _only_with(spec, "band", spec.sparse_rule == "rbbm", "sparse_rule='rbbm'")
    _fraction("ramp", spec.ramp, "a fraction of the training steps in (0, 1]", 0.0, 1.0, True, False)
    _only_with(spec, "ramp", spec.schedule == "cubic", "schedule='cubic'")
    if not (isinstance(spec.update_every, int) and not isinstance(spec.update_every, bool) and spec.update_every >= 1):
        raise ValueError(f"update_every={spec.update_every!r} is not allowed; allowed: an integer >= 1 (steps)")
    _fraction("drop_fraction", spec.drop_fraction, "a fraction in (0, 1)", 0.0, 1.0, True)
    _fraction("rigl_stop", spec.rigl_stop, "a fraction of the training steps in (0, 1]", 0.0, 1.0, True, False)
    for name in ("update_every", "drop_fraction", "rigl_stop"):
        _only_with(spec, name, spec.sparse_rule == "rigl", "sparse_rule='rigl'")
    if spec.sparse_rule == "rigl" and spec.rotated:
        raise ValueError("sparse_rule='rigl' is not allowed with a rotated quantized format: RigL's mask and its "
                         "zero-initialised grown weights live on the weight's own entries; allowed: rotation: none")
    if spec.group is not None:
        if not (isinstance(spec.group, int) and not isinstance(spec.group, bool) and spec.group >= 1):
            raise ValueError(f"group={spec.group!r} is not allowed; allowed: a positive integer that divides "
                             "in_features, or null (one scale per row)")
    _fraction("outliers", spec.outliers, "a fraction in [0, 1)", 0.0, 1.0)
    for name, active in (("group", spec.group is not None), ("outliers", spec.outliers > 0),
                         ("structure" if nm else "sparsity", spec.sparse)):
        if active and spec.learned_scale:
            raise ValueError(f"{name}={getattr(spec, name)!r} is not allowed with scale={spec.scale!r}: a learned "
                             "scale is one per tensor from every entry; allowed: gaussian_rms, absmax")
    for name, active in (("group", spec.group is not None), ("outliers", spec.outliers > 0)):
        if active and not spec.quantized:
            raise ValueError(f"{name}={getattr(spec, name)!r} needs a quantized format (got format={spec.format!r})")
    if spec.outliers and spec.outliers >= 1 - spec.realised_sparsity:
        raise ValueError(f"outliers={spec.outliers!r} must be less than the kept fraction 1 - sparsity = "
                         f"{1 - spec.realised_sparsity:g} (outliers are chosen among the survivors)")


def _check_input_sparsity(spec: TensorSpec) -> None:
    """Refuse what only makes sense for a parameter on the input role (errors prefixed ``input:``)."""
    if spec.sparse_rule != "magnitude":
        raise ValueError(f"input: sparse_rule={spec.sparse_rule!r} is only for the weight role (inputs are not "
                         "parameters: there is nothing to regrow or keep learning); allowed for inputs: magnitude")
    if spec.schedule != "constant":
        raise ValueError(f"input: schedule={spec.schedule!r} is only for the weight role; allowed for inputs: "
                         "constant")
    if spec.structure == "tensor":
        raise ValueError("input: structure='tensor' is only for the weight role: a top-k over a whole batch would "
                         "let later tokens decide which entries of earlier ones survive; allowed for inputs: row, N:M")


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _from_fields(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for a spec dataclass, every error naming ``where``: not a mapping, unknown fields (listing the
    allowed ones), or the spec's own validation."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {_field_names(cls)}, got {data!r}")
    unknown = sorted(set(data) - set(_field_names(cls)))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(_field_names(cls))}")
    try:
        return cls(**data)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None


@dataclass(frozen=True)
class GradSpec:
    """How one backward GEMM of a quantized linear quantizes the output gradient ``g_y`` (docs/numerics.md §8).

    ``grad_input`` is ``g_x̂ = g_y · ŵ`` (reduced over the output channels), ``grad_weight`` is ``g_ŵ = g_yᵀ · x̂``
    (reduced over the tokens). Before quantizing, ``g_y`` is multiplied along the reduced dimension by the other
    operand's value per code unit (half the weight's row step, resp. half the input's token step), so that the other
    operand enters the GEMM as its integer codes, exactly.

    Fields:
        format:   ``bf16`` (not quantized: QuEST's backward), ``int8`` (symmetric, ±127), ``fp8_e4m3`` (max 448),
                  ``fp8_e5m2`` (max 57344). The other fields only matter for a quantized format.
        rounding: ``nearest`` (half up), ``stochastic`` (up with probability equal to the distance from the level
                  below, in steps: unbiased), its random bits from a seeded generator.
        scale:    one absmax scale per ``token`` (row of ``g_y``), per ``channel`` (column of ``g_y``) or per
                  ``block`` of ``block`` consecutive entries along the GEMM's reduced dimension.
        hadamard: rotate the gradient along the reduced dimension by blocks of ``block`` before quantizing (the
                  inverse rotation is folded into the other operand, so the product is unchanged when nothing is
                  rounded).
        block:    the entries per scale (``scale: block``) and per rotation block; a power of two.
    """

    format: str = "bf16"
    rounding: str = "nearest"
    scale: str = "block"
    hadamard: bool = False
    block: int = 128

    def __post_init__(self) -> None:
        _choice("format", self.format, GRAD_FORMATS)
        _choice("rounding", self.rounding, GRAD_ROUNDINGS)
        _choice("scale", self.scale, GRAD_SCALES)
        if not isinstance(self.hadamard, bool):
            raise ValueError(f"hadamard={self.hadamard!r} is not allowed; allowed: true, false")
        if not (isinstance(self.block, int) and not isinstance(self.block, bool) and self.block >= 2
                and not self.block & (self.block - 1)):
            raise ValueError(f"block={self.block!r} is not allowed; allowed: a power of two ≥ 2 such as 128")
        if not self.quantized:
            for name in ("rounding", "scale", "hadamard", "block"):
                if getattr(self, name) != _GRAD_DEFAULTS[name]:
                    raise ValueError(f"{name}={getattr(self, name)!r} is only allowed with a quantized gradient "
                                     f"format ({', '.join(GRAD_FORMATS[1:])}); got format='bf16'")

    @property
    def quantized(self) -> bool:
        """False for ``bf16``: the GEMM takes the gradient as it is."""
        return self.format != "bf16"

    @property
    def stochastic(self) -> bool:
        return self.quantized and self.rounding == "stochastic"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> GradSpec:
        """Build from a plain dict; errors are prefixed with ``where`` (e.g. ``grad_input``)."""
        return _from_fields(cls, data, where)


_GRAD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GradSpec)}


@dataclass(frozen=True)
class Recipe:
    """What each role of a linear layer gets: ``weight`` and ``input`` (activation) specs.

    ``name`` is informational (the preset it came from). Build presets with :func:`load_recipe`.
    ``layout`` says how a weight-only recipe with a rotated weight uses it (docs/numerics.md §5):
    ``rotate_back`` (default) computes ``y = x · (Q(W·H)·Hᵀ)ᵀ``, the rotation undone so the layer approximates
    ``x·Wᵀ``; ``rotated`` computes ``y = x · Q(W·H)ᵀ``, the quantized rotated weight used as it is and the input
    not rotated (QuEST's published weight-only runs). ``rotated`` needs a weight-only recipe (input ``bf16``) whose
    weight is rotated.
    ``grad_input`` / ``grad_weight`` (:class:`GradSpec`) quantize the output gradient of the two backward GEMMs;
    the default ``bf16`` keeps QuEST's backward. Only for recipes with a quantized weight.
    """

    name: str = "bf16"
    weight: TensorSpec = field(default_factory=TensorSpec)
    input: TensorSpec = field(default_factory=TensorSpec)
    layout: str = "rotate_back"
    grad_input: GradSpec = field(default_factory=GradSpec)
    grad_weight: GradSpec = field(default_factory=GradSpec)

    def __post_init__(self) -> None:
        for role in ("weight", "input"):
            if not isinstance(getattr(self, role), TensorSpec):
                raise ValueError(f"{role}: expected a TensorSpec, got {getattr(self, role)!r}")
        _choice("layout", self.layout, LAYOUTS)
        if self.layout == "rotated":
            if self.input.quantized:
                raise ValueError(f"layout='rotated' is only allowed for weight-only recipes (input format bf16); "
                                 f"got input format={self.input.format!r}")
            if not self.weight.rotated:
                raise ValueError(f"layout='rotated' needs a rotated weight (a quantized weight format with rotation: "
                                 f"hadamard); got weight format={self.weight.format!r}, "
                                 f"rotation={self.weight.rotation!r}")
        _check_input_sparsity(self.input)
        for role in GRAD_ROLES:
            spec = getattr(self, role)
            if not isinstance(spec, GradSpec):
                raise ValueError(f"{role}: expected a GradSpec, got {spec!r}")
            if spec.quantized and not self.weight.quantized:
                raise ValueError(f"{role}.format={spec.format!r} needs a quantized weight (the backward is quantized "
                                 f"only in quantized layers); got weight format={self.weight.format!r}")

    @property
    def quantized_backward(self) -> bool:
        """True when either backward GEMM quantizes the output gradient."""
        return self.grad_input.quantized or self.grad_weight.quantized

    @property
    def quantized(self) -> bool:
        """True when any role is quantized."""
        return self.weight.quantized or self.input.quantized

    @property
    def compressed(self) -> bool:
        """True when any role is quantized or sparse: the layer is not a plain linear (``convert`` swaps it)."""
        return self.weight.compressed or self.input.compressed

    def check_in_features(self, in_features: int, layer: str = "linear") -> None:
        """Raise ValueError naming ``layer`` unless every rotated role's block divides ``in_features``."""
        self.weight.check_in_features(in_features, f"{layer} (recipe {self.name!r}, weight)")
        self.input.check_in_features(in_features, f"{layer} (recipe {self.name!r}, input)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the recipe. ``layout``, ``grad_input`` and ``grad_weight`` are written only when they are not
        their defaults, so the records and checkpoints of every other recipe read as before the fields existed (a
        resume compares them)."""
        data = {"name": self.name, "weight": self.weight.to_dict(), "input": self.input.to_dict()}
        if self.layout != "rotate_back":
            data["layout"] = self.layout
        for role in GRAD_ROLES:
            if getattr(self, role).quantized:
                data[role] = getattr(self, role).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; missing roles default to ``bf16``, a missing layout to ``rotate_back``, missing
        backward specs to ``bf16``; unknown keys are errors."""
        keys = ("name", "weight", "input", "layout", *GRAD_ROLES)
        if not isinstance(data, dict):
            raise ValueError(f"recipe: expected a mapping with keys {', '.join(keys)}, got {data!r}")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {unknown}; allowed: {', '.join(keys)}")
        name = data.get("name", "custom")
        weight = TensorSpec.from_dict(dict(data.get("weight") or {}), f"recipe {name!r}: weight")
        inputs = TensorSpec.from_dict(dict(data.get("input") or {}), f"recipe {name!r}: input")
        grads = {role: GradSpec.from_dict(dict(data.get(role) or {}), f"recipe {name!r}: {role}")
                 for role in GRAD_ROLES}
        try:
            return cls(name=str(name), weight=weight, input=inputs, layout=data.get("layout", "rotate_back"), **grads)
        except ValueError as err:
            raise ValueError(f"recipe {name!r}: {err}") from None


def recipe_names() -> list[str]:
    """Names of the presets in ``conf/quant/``."""
    return preset_names("quant")


@functools.cache
def load_recipe(name: str) -> Recipe:
    """The preset ``conf/quant/<name>.yaml`` as a :class:`Recipe` (or a path to such a YAML file); ValueError naming
    the preset and the allowed ones when there is none."""
    return Recipe.from_dict(read_preset("quant", name))
