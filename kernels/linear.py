"""The quantized-linear autograd entry point: one function, two backends (fused Triton kernels or the reference).

:func:`quantized_linear` has the signature of :func:`bitlaw.kernels.quantizers.reference_linear` plus ``backend``:
``"triton"`` runs the fused kernels of :mod:`bitlaw.kernels.triton` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"reference"`` the plain PyTorch oracle, ``"auto"`` Triton on CUDA tensors and the reference elsewhere. Without
the argument the environment variable ``BITLAW_BACKEND`` decides (default auto).
Recipes the kernels do not implement (lsq/absmax scales, ternary/fp grids, int8, other Hadamard blocks, roles in
different domains, fp16/float64 tensors) always run the reference, whatever the backend.

On the Triton path backward needs only the codes, per-row steps and bit-packed masks of both roles (no
activations): :func:`saved_bytes_per_linear` gives that memory next to ``nn.Linear``'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.packing import field_bits, unpack_mask
from bitlaw.kernels.quantizers import reference_linear
from bitlaw.kernels.recipe import Recipe, TensorSpec

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


def _kernels():
    # Imported on first use: Triton is only needed on this path, and TRITON_INTERPRET must be read after the
    # caller (e.g. a test session) has set it.
    from bitlaw.kernels.triton import gemm as triton_gemm
    from bitlaw.kernels.triton import quant as triton_quant

    return triton_quant, triton_gemm


def _spec_reason(spec: TensorSpec, role: str) -> str | None:
    reason = _kernels()[0].unsupported_reason(spec)
    return None if reason is None else f"{role}: {reason}"


def triton_unsupported_reason(recipe: Recipe, x_dtype: torch.dtype = torch.float32,
                              weight_dtype: torch.dtype = torch.float32) -> str | None:
    """Why the Triton path cannot run ``recipe`` on these dtypes (None when it can)."""
    w_spec, x_spec = recipe.weight, recipe.input
    if not w_spec.quantized:
        return "the weight is not quantized (only weight+input and weight-only recipes have kernels)"
    if weight_dtype not in _KERNEL_DTYPES:
        return f"weight dtype {weight_dtype} (the kernels read float32 or bfloat16)"
    if x_spec.quantized:
        if x_dtype not in _KERNEL_DTYPES:
            return f"input dtype {x_dtype} (the kernels read float32 or bfloat16)"
        if w_spec.rotated != x_spec.rotated:
            return "weight and input are quantized in different domains (one rotated, one not)"
        return _spec_reason(w_spec, "weight") or _spec_reason(x_spec, "input")
    return _spec_reason(w_spec, "weight")


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None = None,
                     weight_lsq_scale: torch.Tensor | None = None, input_lsq_scale: torch.Tensor | None = None,
                     stats: dict | None = None, backend: str | None = None) -> torch.Tensor:
    """``y = Q_in(x) · Q_w(w)ᵀ (+ bias)`` by ``recipe`` on the chosen backend (see the module docstring).

    x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None; returns ``[..., N]`` in ``x.dtype``, as the reference.
    ``stats``, if given, receives ``weight_masked_fraction`` / ``input_masked_fraction`` (0-dim tensors).
    """
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit; "
                         "expected x [..., K] and weight [N, K]")
    if select_backend(recipe, x, weight, backend).backend == "triton":
        return _triton_linear(x, weight, recipe, bias, stats)
    return reference_linear(x, weight, recipe, bias, weight_lsq_scale, input_lsq_scale, stats)


@torch.compiler.disable  # the kernels are launched eagerly; a compiled model breaks its graph around them
def _triton_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, bias: torch.Tensor | None,
                   stats: dict | None) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    if recipe.input.quantized:
        y = _FusedQuantizedLinear.apply(x2d, weight, bias, recipe, stats)
    else:
        # Weight-only: the quantized weight rotated back, then an ordinary matmul as the reference does.
        w_hat = _WeightOnlyQuantize.apply(weight, recipe.weight, stats)
        dtype = torch.promote_types(x2d.dtype, w_hat.dtype)
        y = torch.matmul(x2d.to(dtype), w_hat.to(dtype).t())
        if bias is not None:
            y = y + bias
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _record(stats: dict | None, role: str, rows) -> None:
    if stats is not None:
        stats[f"{role}_masked_fraction"] = _kernels()[0].masked_fraction(rows.mask, rows.k)


def _packed_tensors(rows) -> tuple[torch.Tensor, ...]:
    return rows.codes, rows.step, rows.mask


def _layout(rows) -> tuple[int, int, int, bool]:
    return rows.k, rows.bits, rows.packed, rows.rotated


class _FusedQuantizedLinear(torch.autograd.Function):
    """``x2d [M, K]``, ``weight [N, K]``, ``bias [N] | None`` → ``y [M, N]`` in ``x2d.dtype`` (both roles quantized)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, recipe: Recipe, stats: dict | None):  # noqa: D102
        quant, gemm = _kernels()
        xq = quant.quantize_rows(x2d, recipe.input, pack=True)
        wq = quant.quantize_rows(weight, recipe.weight, pack=True)
        y = gemm.quantized_matmul(xq, wq, bias, out_dtype=x2d.dtype)
        _record(stats, "weight", wq)
        _record(stats, "input", xq)
        # Only codes, steps and bit masks are kept: no activation tensor is saved for backward.
        ctx.save_for_backward(*_packed_tensors(xq), *_packed_tensors(wq))
        ctx.layouts = (_layout(xq), _layout(wq))
        ctx.dtypes = (x2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        quant, gemm = _kernels()
        saved = ctx.saved_tensors
        xq = quant.PackedRows(*saved[:3], *ctx.layouts[0])
        wq = quant.PackedRows(*saved[3:], *ctx.layouts[1])
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_y = grad_y.contiguous()
        if grad_y.dtype not in _KERNEL_DTYPES:
            grad_y = grad_y.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm.grad_input(grad_y, xq, wq, out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = gemm.grad_weight(grad_y, xq, wq, out_dtype=w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.float().sum(dim=0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


class _WeightOnlyQuantize(torch.autograd.Function):
    """``weight [N, K]`` → ``Q(w·H)·Hᵀ`` fp32 ``[N, K]`` (rotated back), gradient ``IHT(M ⊙ HT(g))``."""

    @staticmethod
    def forward(ctx, weight, spec: TensorSpec, stats: dict | None):  # noqa: D102
        quant = _kernels()[0]
        wq = quant.quantize_rows(weight, spec, pack=True)
        _record(stats, "weight", wq)
        ctx.save_for_backward(wq.mask)
        ctx.k, ctx.rotated, ctx.dtype = wq.k, wq.rotated, weight.dtype
        return quant.dequantize_rows(wq, unrotate=True)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (mask,) = ctx.saved_tensors
        keep = unpack_mask(mask, ctx.k)
        # The rotate-back is ŵ_h·H, whose adjoint is ·H again; then the trust mask and the inverse rotation.
        grad = block_hadamard(grad) if ctx.rotated else grad.float()
        grad = grad * keep
        grad = block_hadamard(grad) if ctx.rotated else grad
        return grad.to(ctx.dtype), None, None


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
