"""The quantized-linear autograd entry point: one function, two backends (fused Triton kernels or the reference).

:func:`quantized_linear` has the signature of :func:`bitlaw.kernels.quantizers.reference_linear` plus ``backend``:
``"triton"`` runs the fused kernels of :mod:`bitlaw.kernels.triton` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"reference"`` the plain PyTorch oracle, ``"auto"`` Triton on CUDA tensors and the reference elsewhere. Without
the argument the environment variable ``BITLAW_BACKEND`` decides (default auto).
Recipes the kernels do not implement (lsq/lsq_step/absmax scales, ternary/fp grids, int8, the grids with a zero level
int{b}z/int{b}s, other Hadamard blocks, roles in different domains, fp16/float64 tensors, any sparsity, group
scales or outliers, and quantized backwards other than int8 block-scaled without rotation) always run the
reference, whatever the backend.

On the Triton path backward needs only the codes, per-row steps and bit-packed masks of both roles (no
activations): :func:`saved_bytes_per_linear` gives that memory next to ``nn.Linear``'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .gradients import layer_seed
from .packing import field_bits
from .quantizers import reference_linear
from .recipe import Recipe, TensorSpec
from .sparsity import SparseState

BACKENDS = ("auto", "reference", "triton")
BACKEND_ENV = "BITLAW_BACKEND"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _requested(backend: str | None) -> tuple[str, str]:
    """(the requested backend, where the request came from); ValueError for a value not in BACKENDS."""
    source = "the backend argument"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "auto"), f"${BACKEND_ENV}"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} (from {source}) is not allowed; allowed: {', '.join(BACKENDS)}")
    return backend, source


def resolve_backend(backend: str | None = None, device: torch.device | str = "cpu") -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device``: ``backend`` if given, else ``$BITLAW_BACKEND``,
    else auto (Triton on CUDA, the reference elsewhere). Raises ValueError for any other value."""
    backend, _ = _requested(backend)
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "reference"
    return backend


@dataclass(frozen=True)
class BackendChoice:
    """The path one quantized linear call takes: ``backend`` ``"triton"`` or ``"reference"``, and ``reason``, why
    it is not Triton (None when Triton runs)."""

    backend: str
    reason: str | None


def select_backend(recipe: Recipe, x: torch.Tensor, weight: torch.Tensor, backend: str | None = None
                   ) -> BackendChoice:
    """The path :func:`quantized_linear` takes for these tensors, with the reason when it is not Triton."""
    requested, source = _requested(backend)
    if requested == "reference":
        return BackendChoice("reference", f"backend=reference requested ({source})")
    if requested == "auto" and x.device.type != "cuda":
        return BackendChoice("reference", f"backend=auto on {x.device.type} tensors (the Triton kernels run on CUDA)")
    reason = triton_unsupported_reason(recipe, x.dtype, weight.dtype)
    return BackendChoice("reference", f"no Triton kernel: {reason}") if reason else BackendChoice("triton", None)


def _quant():
    # Imported on first use: Triton is only needed on this path, and TRITON_INTERPRET must be read after the
    # caller (e.g. a test session) has set it.
    from .triton import quant

    return quant


def _ops():
    from .triton import ops

    return ops


def _grad_gemm():
    from .triton import grad_gemm

    return grad_gemm


def _compression_reason(spec: TensorSpec, role: str) -> str | None:
    """The sparsity, group and outlier fields of ``spec`` that only the reference implements, named with values."""
    fields = []
    if spec.sparse:
        amount = spec.structure if spec.nm else f"{spec.sparsity:g}"
        detail = f"rule {spec.sparse_rule}" if spec.nm else f"structure {spec.structure}, rule {spec.sparse_rule}"
        fields.append(f"sparsity {amount} ({detail})")
    if spec.group is not None:
        fields.append(f"group {spec.group}")
    if spec.outliers:
        fields.append(f"outliers {spec.outliers:g}")
    if not fields:
        return None
    return f"{role}: {', '.join(fields)} run{'s' if len(fields) == 1 else ''} only on the reference path"


def _spec_reason(spec: TensorSpec, role: str) -> str | None:
    if spec.fmt.kind == "intz":
        # Named here: the kernel module's own test would call int{b}z/int{b}s "not an integer format".
        return (f"{role}: format {spec.format!r} is an integer grid with a zero level (int{{b}}z/int{{b}}s); the "
                f"kernels implement only QuEST's odd grids int1 … int{_quant().MAX_BITS}")
    reason = _quant().unsupported_reason(spec)
    return None if reason is None else f"{role}: {reason}"


@torch.compiler.assume_constant_result  # recipe and dtypes are fixed in a compiled graph: decide once, at trace time
def triton_unsupported_reason(recipe: Recipe, x_dtype: torch.dtype = torch.float32,
                              weight_dtype: torch.dtype = torch.float32) -> str | None:
    """Why the Triton path cannot run ``recipe`` on these dtypes (None when it can)."""
    w_spec, x_spec = recipe.weight, recipe.input
    reason = _compression_reason(w_spec, "weight") or _compression_reason(x_spec, "input")
    if reason is not None:
        return reason
    if not w_spec.quantized:
        return "the weight is not quantized (only weight+input and weight-only recipes have kernels)"
    if weight_dtype not in _KERNEL_DTYPES:
        return f"weight dtype {weight_dtype} (the kernels read float32 or bfloat16)"
    if not x_spec.quantized:
        if recipe.quantized_backward:
            return "a quantized backward (grad_input/grad_weight) has kernels only with a quantized input"
        return _spec_reason(w_spec, "weight")
    if x_dtype not in _KERNEL_DTYPES:
        return f"input dtype {x_dtype} (the kernels read float32 or bfloat16)"
    if w_spec.rotated != x_spec.rotated:
        return "weight and input are quantized in different domains (one rotated, one not)"
    reason = _spec_reason(w_spec, "weight") or _spec_reason(x_spec, "input")
    if reason is None and recipe.quantized_backward:
        # grad_input multiplies the gradient by the weight's codes, grad_weight by the input's.
        reason = _grad_gemm().unsupported_reason(recipe.grad_input, w_spec.fmt.bits, "grad_input") or \
            _grad_gemm().unsupported_reason(recipe.grad_weight, x_spec.fmt.bits, "grad_weight")
    return reason


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                     weight_lsq_scale: torch.Tensor | None = None, input_lsq_scale: torch.Tensor | None = None,
                     stats: dict | None = None, backend: str | None = None,
                     weight_sparse: SparseState | None = None, grad_seed: torch.Tensor | None = None) -> torch.Tensor:
    """``y = Q_in(x) · Q_w(w)ᵀ (+ bias)`` by ``recipe`` on the chosen backend (see the module docstring).

    x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None; returns ``[..., N]``. Under autocast the layer takes
    and returns the autocast dtype, as ``nn.Linear`` does: ``x`` is cast on the way in (the quantizer then reads
    16-bit activations), while the weight is read as it is stored (the fp32 master weight, once per call; never
    a cast copy). Without autocast the output has ``x``'s dtype.
    ``stats``, if given, receives ``weight_masked_fraction`` / ``input_masked_fraction`` (0-dim tensors).
    ``weight_sparse``: the weight's sparsity state (reference path only: sparse recipes never run Triton).
    ``grad_seed``: the seed (0-dim int64 tensor) of a quantized backward's stochastic rounding
    (:func:`bitlaw.kernels.gradients.layer_seed`); None draws one.
    """
    _check_shapes(x, [weight], "quantized_linear")
    x = _autocast_input(x)
    if select_backend(recipe, x, weight, backend).backend == "triton":
        with torch.autocast(x.device.type, enabled=False):
            return _triton_linear(x, [weight], recipe, bias, stats, grad_seed)
    return reference_linear(x, weight, recipe, bias, weight_lsq_scale, input_lsq_scale, stats, weight_sparse,
                            grad_seed)


def group_unsupported_reason(recipe: Recipe) -> str | None:
    """Why :func:`quantized_linear_group` cannot run ``recipe`` (None when it can): one quantization of the input
    serves every weight only when the input is quantized by a fixed rule (no learned scale) and the weight role is
    quantized row by row without per-layer state (no learned scale, no sparsity)."""
    if not recipe.input.quantized:
        return "the input is not quantized (nothing to share)"
    if recipe.input.learned_scale or recipe.weight.learned_scale:
        return "a learned (LSQ) scale belongs to one layer"
    if recipe.weight.sparse or recipe.input.sparse:
        return "sparsity state belongs to one layer"
    return None


def quantized_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], recipe: Recipe,
                           biases: Sequence[torch.Tensor | None] | None = None, backend: str | None = None,
                           grad_seed: torch.Tensor | None = None
                           ) -> list[torch.Tensor]:
    """``[Q_in(x) · Q_w(w_i)ᵀ (+ b_i) for each weight]`` from ONE quantization of ``x`` and one GEMM: the layer of
    the concatenated weight ``[ΣN_i, K]``, split back (each weight role is quantized per row, so the forward equals
    separate layers; a quantized backward quantizes the concatenated output gradient, keyed by ``grad_seed``).

    x: ``[..., K]``; weights: ``[N_i, K]`` of one dtype; biases: all ``[N_i]`` or all None. Returns ``[..., N_i]``
    views of one output. Raises ValueError when :func:`group_unsupported_reason` names a reason.
    """
    reason = group_unsupported_reason(recipe)
    if reason is None and not 1 <= len(weights) <= _ops().MAX_GROUP:
        reason = f"{len(weights)} weights (a group holds 1 to {_ops().MAX_GROUP})"
    if reason is not None:
        raise ValueError(f"quantized_linear_group: recipe {recipe.name!r} cannot share one quantized input: {reason}")
    _check_shapes(x, weights, "quantized_linear_group")
    if len({w.dtype for w in weights}) != 1:
        raise ValueError(f"quantized_linear_group: the weights have different dtypes {[w.dtype for w in weights]}")
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights) or (any(b is None for b in biases) and any(b is not None for b in biases)):
        raise ValueError("quantized_linear_group: give a bias for every weight or for none")
    bias = None if biases[0] is None else torch.cat(biases)
    x = _autocast_input(x)
    if select_backend(recipe, x, weights[0], backend).backend == "triton":
        with torch.autocast(x.device.type, enabled=False):
            y = _triton_linear(x, list(weights), recipe, bias, None, grad_seed)
    else:
        y = reference_linear(x, torch.cat(list(weights)), recipe, bias, grad_seed=grad_seed)
    return list(y.split([w.shape[0] for w in weights], dim=-1))


def _check_shapes(x: torch.Tensor, weights: Sequence[torch.Tensor], what: str) -> None:
    if not weights or x.dim() < 1 or any(w.dim() != 2 or x.shape[-1] != w.shape[1] for w in weights):
        shapes = ", ".join(str(tuple(w.shape)) for w in weights)
        raise ValueError(f"{what}: x {tuple(x.shape)} and weight {shapes} do not fit; expected x [..., K] and "
                         "weight [N, K]")


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def _triton_linear(x: torch.Tensor, weights: list[torch.Tensor], recipe: Recipe, bias: torch.Tensor | None,
                   stats: dict | None, grad_seed: torch.Tensor | None) -> torch.Tensor:
    ops = _ops()
    x2d = x.reshape(-1, x.shape[-1])
    text = ops.recipe_text(recipe)
    n = sum(w.shape[0] for w in weights)
    if recipe.input.quantized:
        if recipe.quantized_backward and grad_seed is None:
            grad_seed = layer_seed("linear")
        given = weights + [None] * (ops.MAX_GROUP - len(weights))
        y, _, _, x_mask, _, _, w_mask = ops.quantized_linear_op(x2d, *given, bias, text, grad_seed)
        _record(stats, "input", x_mask, x.shape[-1])
    else:
        # Weight-only: the quantized weight (rotated back unless layout 'rotated'), then an ordinary matmul as the
        # reference does.
        (weight,) = weights
        w_hat, w_mask = ops.quantized_weight_op(weight, text)
        dtype = torch.promote_types(x2d.dtype, w_hat.dtype)
        y = torch.matmul(x2d.to(dtype), w_hat.to(dtype).t())
        if bias is not None:
            y = y + bias
        y = y.to(x.dtype)
    _record(stats, "weight", w_mask, x.shape[-1])
    return y.reshape(*x.shape[:-1], n)


def _record(stats: dict | None, role: str, mask: torch.Tensor, k: int) -> None:
    if stats is not None:
        stats[f"{role}_masked_fraction"] = _quant().masked_fraction(mask, k)


@dataclass(frozen=True)
class SavedBytes:
    """Bytes kept for backward by one linear layer.

    activation: per-batch tensors (scale with tokens): the Triton path's input codes, steps and mask.
    weight:     per-layer tensors of the weight role (codes, steps, mask; not counting the parameter itself).
    nn_linear:  what ``nn.Linear`` keeps of the activations: the input itself.
    """

    activation: int
    weight: int
    nn_linear: int

    @property
    def ratio(self) -> float:
        """Activation memory relative to ``nn.Linear``'s."""
        return self.activation / self.nn_linear


def _row_bytes(k: int, bits: int) -> int:
    return -(-k * field_bits(2**bits) // 8) + -(-k // 8) + 4  # packed codes + mask bits + one fp32 step


def saved_bytes_per_linear(tokens: int, in_features: int, out_features: int, recipe: Recipe,
                           dtype: torch.dtype = torch.bfloat16) -> SavedBytes:
    """Analytic memory saved for backward by the Triton path for ``tokens`` rows of ``in_features`` in ``dtype``.

    Raises ValueError when the Triton path does not run ``recipe`` (the reference saves full activations).
    """
    reason = triton_unsupported_reason(recipe, dtype, torch.float32)
    if reason is not None:
        raise ValueError(f"saved_bytes_per_linear: recipe {recipe.name!r} runs on the reference path ({reason})")
    itemsize = torch.empty((), dtype=dtype).element_size()
    plain = tokens * in_features * itemsize
    weight = out_features * _row_bytes(in_features, recipe.weight.fmt.bits)
    if not recipe.input.quantized:  # weight-only: the matmul keeps the input; the weight keeps only its mask
        return SavedBytes(activation=plain, weight=out_features * -(-in_features // 8), nn_linear=plain)
    activation = tokens * _row_bytes(in_features, recipe.input.fmt.bits)
    return SavedBytes(activation=activation, weight=weight, nn_linear=plain)


def saved_tensor_bytes(run: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``run()`` builds its graph.

    Tensors sharing memory with one in ``exclude`` (e.g. the weight parameter) are not counted. The graph is freed.
    """
    skip = {t.data_ptr() for t in exclude}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.data_ptr() not in skip:
            seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())
