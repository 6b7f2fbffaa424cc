"""Number formats: their grids, Gaussian-optimal scales and exact Gaussian MSE (GMSE), plus sparsity GMSE.

This module is the single source of the constants of docs/numerics.md §2 (c_b and GMSE per format) and of
the GMSE of pruning used by the scaling laws (docs/scaling-laws.md §3). Everything is computed, never hard-coded:
the MSE of a grid on N(0, 1) data is a sum of truncated-normal moments over the Voronoi cells of the grid,
minimised over the scale in 1-D. Pure numpy/scipy, float64, deterministic; no torch, so `scaling/` can use it on a
laptop.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize, special

_ALLOWED = "int1 … int8, int2z … int8z, int2s … int8s, ternary, fp{bits}_e{E}m{M} (bits = 1+E+M ≤ 8, E ≥ 1), bf16"
_INT_RE = re.compile(r"int(\d+)([zs]?)")
_FP_RE = re.compile(r"fp(\d+)_e(\d+)m(\d+)")
_MAX_BITS = 8
_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Format:
    """How one tensor element is represented; build with `get_format`, not directly.

    `levels` are the representable values at unit scale, sorted ascending, each exactly once (a single 0 where
    the grid has one); a quantizer multiplies them by a scale (e.g. `gaussian_scale(name) * RMS`). For
    `int{b}`, `int{b}z` and `int{b}s` the largest level is exactly 1, so the scale is the (positive) clip value α.
    `bits` is the storage width per element.

    Kinds: "int" (QuEST's centred grid without zero, `int{b}`), "intz" (integers times one step, with a zero
    level: `int{b}z` two's-complement range, `int{b}s` symmetric range; see `integer_range`), "ternary", "fp"
    (minifloats), "identity" (bf16).
    """

    name: str  # canonical name, e.g. "int4", "int4z", "ternary", "fp4_e2m1", "bf16"
    kind: str  # "int" | "intz" | "ternary" | "fp" | "identity"
    bits: int  # storage bits per element
    exponent_bits: int  # E for kind "fp", else 0
    mantissa_bits: int  # M for kind "fp", else 0
    levels: tuple[float, ...]  # sorted ascending, unit scale; () for identity

    @property
    def is_identity(self) -> bool:
        """True for the high-precision pass-through format (bf16): nothing is rounded."""
        return self.kind == "identity"

    @property
    def max_level(self) -> float:
        """Largest representable value at unit scale; `math.inf` for identity."""
        return math.inf if self.is_identity else self.levels[-1]

    @property
    def trust_halfgap(self) -> float:
        """Half the gap between the two largest levels: the trust threshold T of docs/numerics.md §4 at unit scale.

        int{b}: 1/(2^b - 1); int1: 1.0; int{b}z and int{b}s: 1/(2·qmax), half a step; ternary: 0.5;
        fp4_e2m1: 1.0; identity: `math.inf`.
        """
        if self.is_identity:
            return math.inf
        return (self.levels[-1] - self.levels[-2]) / 2.0

    @property
    def integer_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the integers q whose levels are q / qmax, for kind "intz" only.

        int{b}z: (-2^(b-1), 2^(b-1) - 1), e.g. int4z (-8, 7); int{b}s: (-(2^(b-1) - 1), 2^(b-1) - 1), e.g.
        int4s (-7, 7). With a per-row scale α the values are q · step, step = α / qmax. Raises ValueError for
        other kinds: their levels are not integers times one step with a zero (int{b} has the odd codes 2q+1
        over 2^b - 1, see docs/numerics.md §1).
        """
        if self.kind != "intz":
            raise ValueError(f"format {self.name!r} (kind {self.kind!r}) has no integer range; only the grids with "
                             "a zero level, int{b}z and int{b}s, are integers q times one step")
        return _intz_range(self.bits, self.name[-1])


def _int_levels(bits: int) -> tuple[float, ...]:
    # Odd codes 2q+1 over 2^b - 1: the centred grid with no zero whose largest level is exactly 1.
    denominator = 2**bits - 1
    return tuple((2 * q + 1) / denominator for q in range(-(2 ** (bits - 1)), 2 ** (bits - 1)))


def _intz_range(bits: int, suffix: str) -> tuple[int, int]:
    # "z": the two's-complement range of b-bit integers; "s": the same without its lowest value, symmetric.
    qmax = 2 ** (bits - 1) - 1
    return (-qmax - 1 if suffix == "z" else -qmax), qmax


def _intz_levels(bits: int, suffix: str) -> tuple[float, ...]:
    # q / qmax: the largest level is exactly 1, as for int{b}, so the scale is the positive clip value.
    qmin, qmax = _intz_range(bits, suffix)
    return tuple(q / qmax for q in range(qmin, qmax + 1))


def _fp_levels(exponent_bits: int, mantissa_bits: int) -> tuple[float, ...]:
    # IEEE-like with subnormals; which encodings are specials depends on E (see get_format's docstring).
    bias = 2 ** (exponent_bits - 1) - 1
    top_exponent = 2**exponent_bits - 1
    top_mantissa = 2**mantissa_bits - 1
    magnitudes: set[float] = set()
    for exponent in range(top_exponent + 1):
        if exponent_bits >= 5 and exponent == top_exponent:
            continue  # IEEE: the all-ones exponent encodes inf/NaN
        for mantissa in range(top_mantissa + 1):
            if exponent_bits == 4 and exponent == top_exponent and mantissa == top_mantissa:
                continue  # OCP E4M3FN: only the all-ones pattern is NaN
            if exponent == 0:  # subnormal (and zero)
                value = math.ldexp(mantissa, 1 - bias - mantissa_bits)
            else:
                value = math.ldexp(2**mantissa_bits + mantissa, exponent - bias - mantissa_bits)
            magnitudes.add(value)
    positive = sorted(v for v in magnitudes if v > 0.0)
    return tuple([-v for v in reversed(positive)] + [0.0] + positive)


def _unknown(name: object, why: str) -> ValueError:
    return ValueError(f"format {name!r}: {why}; allowed: {_ALLOWED}")


@functools.cache
def get_format(name: str) -> Format:
    """The `Format` called `name`: `int1` … `int8`, `int2z` … `int8z`, `int2s` … `int8s`, `ternary`, `bf16`
    or any valid `fp{bits}_e{E}m{M}` (`named_formats` lists the ones the project uses).

    `int{b}z` and `int{b}s` (kind "intz") are the integers q of `Format.integer_range` over qmax, b = 2 … 8: at
    one bit there is no positive level to scale.

    Decision on fp special values: with E ≤ 3 every encoding is finite (as MX FP4/FP6: fp4_e2m1 is
    ±{0, .5, 1, 1.5, 2, 3, 4, 6}, fp6_e2m3 max 7.5, fp6_e3m2 max 28); with E = 4 only the all-ones
    exponent+mantissa pattern is NaN (OCP E4M3FN: fp8_e4m3 max 448); with E ≥ 5 the all-ones exponent is
    reserved for inf/NaN as in IEEE (fp8_e5m2 max 57344). Subnormals are always present, bias = 2^(E-1) - 1.

    Raises ValueError, naming `name` and the allowed forms, for anything else (names are case-sensitive and
    must be canonical: no leading zeros).
    """
    if not isinstance(name, str):
        raise _unknown(name, "a format name must be a string")
    if name == "bf16":
        return Format(name, "identity", 16, 0, 0, ())
    if name == "ternary":
        return Format(name, "ternary", 2, 0, 0, (-1.0, 0.0, 1.0))
    match = _INT_RE.fullmatch(name)
    if match:
        bits, suffix = int(match.group(1)), match.group(2)
        if not suffix and not 1 <= bits <= _MAX_BITS:
            raise ValueError(f"format {name!r}: integer formats take 1 to {_MAX_BITS} bits (int1 … int8)")
        if suffix and not 2 <= bits <= _MAX_BITS:
            # One bit leaves int1z = {-1, 0} and int1s = {0}: no positive level to scale.
            raise _unknown(name, f"integer formats with a zero level take 2 to {_MAX_BITS} bits "
                                 f"(int2{suffix} … int{_MAX_BITS}{suffix})")
        if f"int{bits}{suffix}" != name:
            raise _unknown(name, f"write it as 'int{bits}{suffix}'")
        if suffix:
            return Format(name, "intz", bits, 0, 0, _intz_levels(bits, suffix))
        return Format(name, "int", bits, 0, 0, _int_levels(bits))
    match = _FP_RE.fullmatch(name)
    if match:
        bits, exponent_bits, mantissa_bits = (int(g) for g in match.groups())
        if bits != 1 + exponent_bits + mantissa_bits:
            raise _unknown(
                name,
                f"bits must equal 1+E+M = 1+{exponent_bits}+{mantissa_bits} = "
                f"{1 + exponent_bits + mantissa_bits}, got {bits}",
            )
        if exponent_bits < 1:
            raise _unknown(name, "fp formats need at least one exponent bit (E ≥ 1)")
        if bits > _MAX_BITS:
            raise _unknown(name, f"fp formats take at most {_MAX_BITS} bits, got {bits}")
        canonical = f"fp{bits}_e{exponent_bits}m{mantissa_bits}"
        if canonical != name:
            raise _unknown(name, f"write it as {canonical!r}")
        levels = _fp_levels(exponent_bits, mantissa_bits)
        return Format(name, "fp", bits, exponent_bits, mantissa_bits, levels)
    raise _unknown(name, "unknown format")


def named_formats() -> tuple[str, ...]:
    """The canonical list of formats the project names (configs, tables, tests), low bits first per kind.

    Of the grids with a zero level only the 4- and 8-bit ones are named: those are the widths serving engines
    store integer weights in (int4 and int8 times one scale), the reason these grids exist; `get_format` accepts
    the other widths too.
    """
    return (
        *(f"int{b}" for b in range(1, _MAX_BITS + 1)),
        "int4z",
        "int8z",
        "int4s",
        "int8s",
        "ternary",
        "fp4_e2m1",
        "fp6_e2m3",
        "fp6_e3m2",
        "fp8_e4m3",
        "fp8_e5m2",
        "fp8_e2m5",
        "fp8_e3m4",
        "bf16",
    )


def _as_grid(levels: object) -> np.ndarray:
    grid = np.unique(np.asarray(levels, dtype=np.float64))  # sorted, duplicates merged
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
        raise ValueError(f"levels must be a non-empty 1-D sequence of finite numbers, got {levels!r}")
    return grid


def _grid_mse_many(grid: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """E[(X - Q_s(X))^2] for X ~ N(0,1) and every scale s in `scales`; `grid` sorted and unique."""
    centres = scales[:, None] * grid[None, :]  # [scales, levels]
    midpoints = (centres[:, 1:] + centres[:, :-1]) / 2.0
    edge = np.full((scales.size, 1), np.inf)
    lower = np.concatenate([-edge, midpoints], axis=1)
    upper = np.concatenate([midpoints, edge], axis=1)
    # Cell probability from the tail on the cell's own side, so far-out cells keep their relative precision
    # instead of being a difference of two numbers close to 1.
    mass = np.where(
        lower >= 0.0,
        special.ndtr(-lower) - special.ndtr(-upper),
        special.ndtr(upper) - special.ndtr(lower),
    )
    with np.errstate(invalid="ignore"):  # inf * 0 at the open ends; those terms are 0 by the limit
        pdf_lower = np.exp(-0.5 * lower**2) / math.sqrt(2.0 * math.pi)
        pdf_upper = np.exp(-0.5 * upper**2) / math.sqrt(2.0 * math.pi)
        term_lower = np.where(np.isfinite(lower), pdf_lower * (lower - 2.0 * centres), 0.0)
        term_upper = np.where(np.isfinite(upper), pdf_upper * (upper - 2.0 * centres), 0.0)
    # ∫_a^b (x-c)^2 φ = M2 - 2c M1 + c^2 M0 with M0 = Φ(b)-Φ(a), M1 = φ(a)-φ(b), M2 = M0 + aφ(a) - bφ(b),
    # regrouped as M0 (1 + c^2) + φ(a)(a - 2c) - φ(b)(b - 2c).
    per_cell = mass * (1.0 + centres**2) + term_lower - term_upper
    return per_cell.sum(axis=1)


def grid_mse(levels: object, scale: float) -> float:
    """Exact E[(X - Q(X))^2] for X ~ N(0, 1), Q rounding to the nearest of `levels * scale`.

    `levels`: any 1-D sequence of finite numbers (sorted and de-duplicated here); `scale` > 0 and finite.
    Computed from truncated-normal moments over the Voronoi cells, in float64.
    """
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(_grid_mse_many(_as_grid(levels), np.array([float(scale)]))[0])


_SCAN_PER_OCTAVE = 32
_REFINE_CANDIDATES = 8


def _optimal_scale(grid: np.ndarray) -> tuple[float, float]:
    """(scale, mse) minimising `grid_mse(grid, scale)`: the global minimum, found deterministically."""
    magnitudes = np.abs(grid[grid != 0.0])
    # The optimum clips somewhere between "the largest level sits at 0.25σ" (far too tight) and "the smallest
    # nonzero level sits at 8σ" (everything rounds to the innermost levels): scan that range in log scale.
    log_lo = math.log2(0.25 / magnitudes.max())
    log_hi = math.log2(8.0 / magnitudes.min())
    count = int(math.ceil((log_hi - log_lo) * _SCAN_PER_OCTAVE)) + 1
    log_scales = np.linspace(log_lo, log_hi, count) * math.log(2.0)
    values = _grid_mse_many(grid, np.exp(log_scales))
    # fp grids have several local minima (roughly one per octave): refine the best few scan minima, keep the
    # lowest. Sorting by (value, index) keeps the choice deterministic under ties.
    inner = np.arange(1, count - 1)
    minima = inner[(values[inner] <= values[inner - 1]) & (values[inner] <= values[inner + 1])]
    minima = sorted(minima.tolist(), key=lambda i: (values[i], i))[:_REFINE_CANDIDATES]
    if not minima:
        raise RuntimeError(f"no interior minimum of the Gaussian MSE found for grid {grid.tolist()}")
    best_scale, best_mse = math.nan, math.inf
    for index in minima:
        # Optimise ln(scale): the tolerance is then relative, the same for scales of 1e-4 and 1e4.
        result = optimize.minimize_scalar(
            lambda u: float(_grid_mse_many(grid, np.array([math.exp(u)]))[0]),
            bounds=(float(log_scales[index - 1]), float(log_scales[index + 1])),
            method="bounded",
            options={"xatol": 1e-12, "maxiter": 500},
        )
        scale = _stationary_scale(grid, math.exp(log_scales[index - 1]), math.exp(log_scales[index + 1]), result.x)
        mse = float(_grid_mse_many(grid, np.array([scale]))[0])
        if mse < best_mse:
            best_scale, best_mse = scale, mse
    return best_scale, best_mse


def _stationary_scale(grid: np.ndarray, lo: float, hi: float, log_guess: float) -> float:
    """Root of dMSE/ds in [lo, hi], to machine precision; ``exp(log_guess)`` if the derivative has no sign change.

    The MSE is flat at its minimum, so minimising it pins the scale only to ~sqrt(eps); its derivative
    -2 (Σ l_i ∫_cell x φ − s Σ l_i² ∫_cell φ) crosses zero there steeply (the cell-edge terms cancel because
    the error is continuous across a midpoint). For ``int1`` the root is exactly sqrt(2/π).
    """
    def half_slope(scale: float) -> float:
        centres = scale * grid
        mid = (centres[1:] + centres[:-1]) / 2.0
        lower, upper = np.concatenate([[-np.inf], mid]), np.concatenate([mid, [np.inf]])
        mass = np.where(lower >= 0.0, special.ndtr(-lower) - special.ndtr(-upper),
                        special.ndtr(upper) - special.ndtr(lower))
        first = (np.exp(-0.5 * lower**2) - np.exp(-0.5 * upper**2)) / math.sqrt(2.0 * math.pi)
        return float(scale * np.sum(grid**2 * mass) - np.sum(grid * first))

    if half_slope(lo) < 0.0 < half_slope(hi):
        return float(optimize.brentq(half_slope, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=200))
    return math.exp(log_guess)


@functools.cache
def _optimum(name: str) -> tuple[float, float]:
    fmt = get_format(name)
    if fmt.is_identity:
        return 1.0, 0.0
    return _optimal_scale(_as_grid(fmt.levels))


def gaussian_scale(name: str) -> float:
    """Scale multiplying `get_format(name).levels` that minimises the MSE on N(0, 1) data (in RMS units).

    For `int{b}` this is c_b of docs/numerics.md §2 (α / RMS). Identity formats (bf16) return 1.0. Cached.
    """
    return _optimum(name)[0]


def gmse(name: str) -> float:
    """Gaussian MSE of format `name` at its `gaussian_scale` (docs/numerics.md §2); bf16 → 0.0. Cached."""
    return _optimum(name)[1]


def sparsity_gmse(sparsity: float) -> float:
    """Gaussian MSE of unstructured magnitude pruning of a fraction `sparsity` in [0, 1) of N(0, 1) data.

    The smallest-|x| fraction is zeroed: MSE = ∫_{|x|<t} x^2 φ = s - 2 t φ(t) with t = Φ^-1((1 + s) / 2).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    threshold = float(special.ndtri((1.0 + sparsity) / 2.0))
    density = math.exp(-0.5 * threshold**2) / math.sqrt(2.0 * math.pi)
    return sparsity - 2.0 * threshold * density


def nm_sparsity_gmse(n: int, m: int) -> float:
    """Gaussian MSE per element of N:M structured pruning: in every group of m i.i.d. N(0, 1) values the n
    largest |x| are kept and the other m - n zeroed (2:4 → ≈ 0.132). Requires 1 ≤ m and 0 ≤ n ≤ m.

    Exact up to quadrature error (~1e-12): with Y = |X| half-normal (CDF F, density f), the pruned values are
    the m - n smallest order statistics, and Σ_{k ≤ m-n} f_(k)(y) = m f(y) P[Bin(m-1, F(y)) ≤ m-n-1], so
    MSE = ∫_0^∞ y^2 f(y) P[Bin(m-1, F(y)) ≤ m-n-1] dy (the 1/m of "per element" cancels the m).
    """
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)):
        raise ValueError(f"N:M sparsity takes integers n and m, got n={n!r}, m={m!r}")
    if not (m >= 1 and 0 <= n <= m):
        raise ValueError(f"N:M sparsity needs 1 ≤ m and 0 ≤ n ≤ m (keep n of every m), got {n}:{m}")
    pruned = m - n
    if pruned == 0:
        return 0.0

    def integrand(y: float) -> float:
        below = math.erf(y / _SQRT2)  # F(y) = P(|X| < y)
        above = math.erfc(y / _SQRT2)  # 1 - F(y) without cancellation in the tail
        at_most = sum(math.comb(m - 1, j) * below**j * above ** (m - 1 - j) for j in range(pruned))
        return y * y * 2.0 * math.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi) * at_most

    value, _ = integrate.quad(integrand, 0.0, math.inf, epsabs=1e-14, epsrel=1e-12, limit=200)
    return float(value)
