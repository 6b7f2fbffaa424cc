"""GPTQ and SparseGPT for one linear layer: Optimal Brain Surgeon column sweeps (docs/compress.md §2).

A linear layer computes ``y = x · Wᵀ`` with ``W`` ``[out, in]``. Over ``N`` calibration rows ``X`` ``[N, in]`` the
layer-wise objective is the mean squared output error, summed over output channels,

    E(Ŵ) = ‖(W − Ŵ) · Xᵀ‖²_F / N = ½ · Σ_rows (w − ŵ) · H · (w − ŵ)ᵀ,   H = 2 · XᵀX / N,

so ``H`` (what :class:`HessianAccumulator` builds) is the Hessian of ``E`` with respect to each row. The sweep fixes
one column at a time (rounds it to the grid and/or prunes it) and moves the not yet fixed columns by the Optimal
Brain Surgeon update, which keeps ``E`` minimal given the fixed ones. With ``U`` the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = UᵀU``), fixing column ``j`` to ``q`` costs ``(w_j − q)² / (2 U_jj²)`` per row, and the summed costs
equal ``½ Σ_rows δ · H · δᵀ`` for ``δ = Ŵ − W`` exactly (the update is ``δ = −e · U`` with ``e_j = (w_j − q_j)/U_jj``,
so ``δ H δᵀ = e U U⁻¹ U⁻ᵀ Uᵀ eᵀ = ‖e‖²``), whatever the block size or column order. ``H`` here is the matrix the
sweep used: dampened, with dead inputs set to 1 on the diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.hadamard import block_hadamard
from ..kernels.quantizers import round_to_grid, row_scale, unrotate
from ..kernels.recipe import TensorSpec
from ..kernels.sparsity import descending_rank, kept_count, magnitude_keep


class HessianAccumulator:
    """The running ``H = 2/N · Σ xᵀx`` of a layer's inputs (float64, ``[in, in]``), ``N`` the rows seen so far.

    Call :meth:`add` with every calibration batch ``x`` ``[..., in]`` (any float dtype, any device; ``H`` lives on
    the device of the first batch). A running mean, so batches of any size weigh by their row count.
    """

    def __init__(self, in_features: int):
        if not (isinstance(in_features, int) and not isinstance(in_features, bool) and in_features >= 1):
            raise ValueError(f"in_features={in_features!r} is not allowed; allowed: a positive integer")
        self.in_features = in_features
        self.rows = 0
        self._hessian: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` ``[..., in_features]`` into ``H``."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit: expected [..., {self.in_features}]")
        if self._hessian is None:
            self._hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        rows = x.detach().reshape(-1, self.in_features).to(device=self._hessian.device, dtype=torch.float64)
        total = self.rows + rows.shape[0]
        if total == 0:
            return
        # Rescale the mean so far, then add the new rows: the result never depends on how the rows were batched.
        self._hessian.mul_(self.rows / total).add_(rows.T @ rows, alpha=2.0 / total)
        self.rows = total

    @property
    def hessian(self) -> torch.Tensor:
        """``H`` ``[in, in]`` float64 (zeros before any row was added)."""
        if self._hessian is None:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        return self._hessian


@dataclass
class LayerResult:
    """What :func:`compress_layer` returns for a weight ``[out, in]``.

    weight:   ``[out, in]`` fp32, the compressed weight in the layer's own domain: the layer computes
              ``x · weightᵀ`` with a plain matmul (a rotated spec's weight is rotated back).
    stored:   ``[out, in]`` fp32, the compressed weight in the stored domain of ``spec`` (``weight · blockdiag(H)``
              when ``spec.rotated``, else ``weight``): pruned entries exactly 0, the others on the grid.
    mask:     ``[out, in]`` bool, the kept entries of ``stored`` (all True without sparsity).
    loss:     the accumulated OBS cost ``Σ (w_j − q_j)² / (2 U_jj²)``, equal to ``½ Σ_rows δ H_d δᵀ`` with
              ``δ = stored − W_stored`` and ``H_d`` the dampened Hessian of the stored domain; with ``damp=0`` and no
              dead input that is ``‖(W − weight) · Xᵀ‖² / N`` for ``H = 2XᵀX/N``.
    sparsity: the realised fraction of pruned entries.
    codes:    ``[out, in]`` int16 codes of ``stored`` as ``kernels.quantizers.QuantResult`` defines them (meaningless
              where ``mask`` is False); None when ``spec`` does not quantize.
    scale:    ``[out, 1]`` fp32 per-row scale of the unit grid; None when ``spec`` does not quantize.
    step:     ``[out, 1]`` fp32 step of the integer grids (``dequantize(codes, step, fmt)`` gives ``stored``);
              None for other grids and without quantization.
    """

    weight: torch.Tensor
    stored: torch.Tensor
    mask: torch.Tensor
    loss: float
    sparsity: float
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    step: torch.Tensor | None = None


def rotate_hessian(hessian: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The Hessian of the stored domain: ``Hadᵀ · H · Had`` when ``spec.rotated`` (``Had = blockdiag(H_block)``),
    else ``H``. With ``x_h = x · Had`` and ``W_h = W · Had``, ``x · Wᵀ = x_h · W_hᵀ`` (``Had`` is orthonormal), so
    ``2/N · X_hᵀX_h = Hadᵀ H Had``."""
    if not spec.rotated:
        return hessian
    # block_hadamard multiplies the last dimension by the symmetric Had: H·Had, then (H·Had)ᵀ·Had.
    return block_hadamard(block_hadamard(hessian, spec.block).T.contiguous(), spec.block)


def damped(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H_d, dead)``: ``H`` (float64 copy) with the diagonal of dead inputs (``H_jj = 0``: the input is always 0,
    the weight column does not matter) set to 1, then ``damp · mean(diag H)`` added to the whole diagonal; ``dead``
    is bool ``[in]``."""
    h = hessian.to(torch.float64).clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += damp * diagonal.mean()
    return h, dead


def inverse_cholesky(h: torch.Tensor, out_features: int) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) for a symmetric ``h`` ``[in, in]``; ValueError naming the
    layer size when ``h`` is not positive definite."""
    lower, info = torch.linalg.cholesky_ex(h)
    if not info:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if not info:
            return upper
    raise ValueError(f"the dampened Hessian of a layer with in_features={h.shape[0]}, out_features={out_features} "
                     "is not positive definite (the calibration inputs are linearly dependent); use a larger damp, "
                     "e.g. 0.1, or more calibration rows")


def check_arguments(weight: torch.Tensor, hessian: torch.Tensor, spec: TensorSpec | None, sparsity: float,
                    nm: tuple[int, int] | None, damp: float, block_size: int, act_order: bool
                    ) -> tuple[float, tuple[int, int] | None]:
    """Validate :func:`compress_layer`'s arguments; returns the effective ``(sparsity, nm)`` (from ``spec`` when
    the arguments leave them unset)."""
    if weight.dim() != 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not allowed; allowed: a 2-D [out, in] tensor")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}; "
                         f"allowed: [{in_features}, {in_features}]")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian has non-finite entries (inf or nan); allowed: finite values (check the "
                         "calibration activations)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite entries (inf or nan); allowed: finite values")
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp={damp!r} is not allowed; allowed: a finite number >= 0 (0.01 in GPTQ)")
    if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1):
        raise ValueError(f"block_size={block_size!r} is not allowed; allowed: a positive integer (128 in GPTQ)")
    if not (isinstance(sparsity, int | float) and not isinstance(sparsity, bool) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity={sparsity!r} is not allowed; allowed: a fraction in [0, 1)")
    if spec is not None:
        if spec.learned_scale:
            raise ValueError(f"spec scale={spec.scale!r} is not allowed: a learned scale comes from training; "
                             "allowed: gaussian_rms, absmax")
        for name, value in (("group", spec.group), ("outliers", spec.outliers)):
            if value:
                raise ValueError(f"spec {name}={value!r} is not allowed here; allowed: {name} unset (one scale per "
                                 "row, no outliers)")
        if spec.structure == "tensor":
            raise ValueError("spec structure='tensor' is not allowed here; allowed: row or N:M (the sweep prunes "
                             "the same count in every row)")
        if spec.sparse:
            if sparsity or nm:
                raise ValueError(f"sparsity={sparsity!r}, nm={nm!r} given with a sparse spec (sparsity="
                                 f"{spec.sparsity!r}, structure={spec.structure!r}); allowed: one of the two")
            sparsity, nm = spec.sparsity, spec.nm
        spec.check_in_features(in_features, f"compress_layer (weight {tuple(weight.shape)})")
    if nm is not None:
        valid = (isinstance(nm, tuple) and len(nm) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in nm))
        if not (valid and 1 <= nm[0] < nm[1] and in_features % nm[1] == 0):
            raise ValueError(f"nm={nm!r} is not allowed for in_features={in_features}; allowed: a pair (N, M) of "
                             "integers with 1 <= N < M and M dividing in_features, such as (2, 4)")
        if sparsity:
            raise ValueError(f"sparsity={sparsity!r} given with nm={nm!r}; allowed: one of the two (N:M sets the "
                             "sparsity itself)")
        if act_order:
            raise ValueError("act_order=True is not allowed with nm: N:M groups are consecutive columns, which the "
                             "reordering would split; allowed: act_order=False")
    return float(sparsity), nm


def compress_layer(weight: torch.Tensor, hessian: torch.Tensor, *, spec: TensorSpec | None = None,
                   sparsity: float = 0.0, nm: tuple[int, int] | None = None, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False) -> LayerResult:
    """Prune and/or quantize one linear layer by the OBS column sweep of GPTQ (quantization) and SparseGPT (pruning;
    both in one sweep when both are asked). See :class:`LayerResult` for what comes back.

    weight: ``[out, in]`` (any float dtype); hessian: ``[in, in]`` (``HessianAccumulator.hessian``).
    spec: a quantized :class:`TensorSpec` rounds onto its grid with per-row scales (``gaussian_rms`` or
        ``absmax``) computed once from the (rotated) weight before the sweep, from the entries magnitude pruning at
        the target sparsity would keep, as ``kernels.quantizers.quantize`` takes them from its survivors. With
        ``spec.rotated`` the sweep runs in the rotated domain (weight ``W·Had``, Hessian ``Hadᵀ H Had``). A sparse
        spec supplies ``sparsity``/``nm`` when the arguments leave them unset. None: no quantization.
    sparsity: fraction of each row pruned, ``⌊s·in + ½⌋`` entries per row (``kernels.sparsity.kept_count``), chosen
        block by block by the OBS saliency ``w² / U_jj²`` of the current weights.
    nm: ``(N, M)``: in every M consecutive columns of each row keep the N of largest saliency.
    damp: ``damp · mean(diag H)`` is added to the diagonal (after dead inputs got 1).
    block_size: columns fixed per block before the lazy update of the rest (rounded down to a multiple of M with
        ``nm``, at least M); the result does not depend on it beyond rounding error.
    act_order: sweep the columns in order of descending ``diag H`` (GPTQ's act-order); the results come back in
        the original order.

    Raises ValueError for bad arguments (before any work) and when the dampened Hessian is not positive definite.
    """
    sparsity, nm = check_arguments(weight, hessian, spec, sparsity, nm, damp, block_size, act_order)
    quantized = spec is not None and spec.quantized
    rotated = spec is not None and spec.rotated
    out_features, in_features = weight.shape
    device = weight.device

    w = weight.detach().to(torch.float64)
    h = hessian.detach().to(device=device, dtype=torch.float64)
    if rotated:
        w = block_hadamard(w, spec.block)
        h = rotate_hessian(h, spec)
    h, dead = damped(h, damp)
    w[:, dead] = 0.0  # the input is always 0: the column is free, and 0 is what it costs nothing to store

    scale = None
    if quantized:
        survivors = magnitude_keep(w, f"{nm[0]}:{nm[1]}", 0.0) if nm else (
            magnitude_keep(w, "row", sparsity) if sparsity else None)
        scale = row_scale(w, spec, where=survivors).float().to(torch.float64)

    order = torch.arange(in_features, device=device)
    if act_order:
        order = torch.sort(h.diagonal(), descending=True, stable=True).indices
        w, h = w[:, order], h[order][:, order]
    u = inverse_cholesky(h, out_features)

    pruned_total = in_features - kept_count(in_features, sparsity) if sparsity else 0
    if nm:
        block_size = max(block_size - block_size % nm[1], nm[1])
    keep = torch.ones_like(w, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block, u_block = w[:, start:end].clone(), u[start:end, start:end]
        d = u_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if sparsity:
            # SparseGPT's adaptive mask, per row: the cumulative count pruned by the end of this block follows
            # the row's total in proportion to the columns swept, so every row ends at exactly pruned_total.
            count = round(pruned_total * end / in_features) - round(pruned_total * start / in_features)
            block_keep = descending_rank(-(block.square() / d.square())) >= count
        for i in range(end - start):
            if nm and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = block[:, group].square() / d[group].square()
                block_keep[:, group] = descending_rank(saliency) < nm[0]
            column = block[:, i]
            fixed = round_to_grid(column[:, None], scale, spec.fmt)[0][:, 0] if quantized else column
            fixed = torch.where(block_keep[:, i], fixed, 0.0)
            error = (column - fixed) / d[i]
            loss += error.square().sum() / 2
            # The OBS update of the columns of this block not yet fixed; the later blocks get it in one matmul.
            block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            block[:, i] = fixed
            errors[:, i] = error
        w[:, start:end] = block
        keep[:, start:end] = block_keep
        w[:, end:] -= errors @ u[start:end, end:]

    inverse = torch.argsort(order)
    w, keep = w[:, inverse], keep[:, inverse]
    codes = step = scale32 = None
    stored = w.float()
    if quantized:
        # Re-rounding the fp32 values (each at a level) in fp32 gives the codes, scale and step exactly as the
        # kernels' quantizer would compute them, so dequantize(codes, step) reproduces `stored` bitwise.
        scale32 = scale.float()
        values, codes, step = round_to_grid(stored, scale32, spec.fmt)
        stored = torch.where(keep, values, 0.0)
    result_weight = unrotate(stored, spec) if rotated else stored.clone()
    return LayerResult(weight=result_weight, stored=stored, mask=keep, loss=float(loss),
                       sparsity=1.0 - keep.double().mean().item(), codes=codes, scale=scale32, step=step)
