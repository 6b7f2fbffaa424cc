"""The sequential calibration pass of GPTQ/SparseGPT over a whole LlamaModel (docs/compress.md §2).

The model is compressed one block at a time, and inside a block one group of projections at a time, in the order
the data flows: q/k/v (one shared input, one Hessian), o_proj, gate/up (shared), down_proj. Each group's Hessian is
accumulated from the inputs produced by the already compressed projections before it, in this block and in the
blocks before, as GPTQ and SparseGPT do; the block's outputs are then recomputed with its compressed weights and
become the next block's inputs. Only one block's projection Hessians exist at a time, and activations are folded
into them chunk by chunk, so memory holds the calibration hidden states ``[S, T, d]`` twice plus one group's inputs
for one chunk of sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.recipe import Recipe, TensorSpec
from ..models.frozen_linear import FrozenQuantLinear
from ..models.llama import LlamaBlock, LlamaModel
from ..models.quant_linear import QuantLinear
from .obs import HessianAccumulator, check_arguments, compress_layer
from .scheduler import layer_pruning_loss

# The groups of a block's projections in the order the sequential pass compresses them; the members of a group read
# the same input, so one Hessian serves the whole group.
GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
PROJECTIONS: tuple[str, ...] = tuple(name for group in GROUPS for name in group)


@dataclass(frozen=True)
class LayerSummary:
    """What :func:`compress_model` reports for one projection.

    sparsity: the realised fraction of zero entries of the written weight's mask (``LayerResult.sparsity``).
    loss:     the sweep's OBS loss (``LayerResult.loss``, units of docs/compress.md §1) on the inputs it saw.
    params:   the weight's entry count, ``out · in``.
    rows:     the calibration rows (tokens) its Hessian accumulated, ``S · T``.
    """

    sparsity: float
    loss: float
    params: int
    rows: int


def _layer_names(model: LlamaModel, layer_filter: Sequence[str]) -> list[str]:
    """Module names (``layers.{i}.{projection}``) of the projections the pass covers, in pass order."""
    return [f"layers.{i}.{name}" for i in range(len(model.layers)) for group in GROUPS for name in group
            if name in layer_filter]


def _check_model_input(model: LlamaModel, calibration: torch.Tensor, layer_filter: Sequence[str],
                       chunk_size: int) -> None:
    cfg = model.config
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype.is_floating_point \
            or calibration.dtype.is_complex or calibration.dtype == torch.bool:
        got = f"shape {tuple(calibration.shape)}, dtype {calibration.dtype}" if isinstance(
            calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration ({got}) is not allowed; allowed: token ids, a 2-D integer tensor [S, T]")
    sequences, length = calibration.shape
    if sequences < 1 or not 1 <= length <= cfg.max_seq_len:
        raise ValueError(f"calibration of shape {tuple(calibration.shape)} is not allowed; allowed: [S, T] with "
                         f"S >= 1 sequences and 1 <= T <= max_seq_len={cfg.max_seq_len}")
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"calibration token ids span [{low}, {high}]; allowed: ids in [0, {cfg.vocab_size}) "
                         "(the model's vocab_size)")
    if isinstance(layer_filter, str) or not layer_filter or not set(layer_filter) <= set(PROJECTIONS):
        raise ValueError(f"layer_filter={layer_filter!r} is not allowed; allowed: a non-empty collection of "
                         f"{list(PROJECTIONS)}")
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed; allowed: a positive integer (sequences per "
                         "forward)")


def _linear(model: LlamaModel, name: str) -> nn.Linear:
    """The projection ``name``; ValueError unless it is a plain linear (nn.Linear or a QuantLinear whose recipe
    neither quantizes nor sparsifies), whose weight the layer uses as stored."""
    module = model.get_submodule(name)
    if isinstance(module, QuantLinear):
        if module.recipe.compressed:
            raise ValueError(f"layer {name!r} is a QuantLinear with the compressed recipe {module.recipe.name!r}: "
                             "it re-quantizes its master weight at every forward, so a written weight would not be "
                             "used as compressed. Post-training compression of quantization-aware-trained layers "
                             "needs a frozen quantized layer, which is not implemented yet; allowed: nn.Linear or "
                             "a QuantLinear with a bf16 recipe")
    elif type(module) is not nn.Linear:
        raise ValueError(f"layer {name!r} is a {type(module).__name__}; allowed: nn.Linear or a QuantLinear with a "
                         "bf16 recipe")
    return module


def _capture(block: LlamaBlock, leaders: dict[str, nn.Linear], hidden: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, chunk_size: int) -> dict[str, HessianAccumulator]:
    """Run ``block`` on ``hidden`` ``[S, T, d]`` chunk by chunk and return the Hessian of each leader's inputs
    (keyed like ``leaders``). The hooks fold each chunk's inputs into ``H`` at once, so no activation outlives its
    chunk, and they are removed whatever happens."""
    accumulators = {key: HessianAccumulator(module.in_features) for key, module in leaders.items()}

    def fold(accumulator: HessianAccumulator):
        def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            accumulator.add(args[0])
        return hook

    handles = [module.register_forward_hook(fold(accumulators[key])) for key, module in leaders.items()]
    try:
        for chunk in hidden.split(chunk_size):
            block(chunk, cos, sin)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _block_outputs(block: LlamaBlock, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   chunk_size: int) -> torch.Tensor:
    return torch.cat([block(chunk, cos, sin) for chunk in hidden.split(chunk_size)])


class _Pass:
    """The embeddings of the calibration tokens and the RoPE tables, advanced block by block; restores the model's
    train/eval mode on exit."""

    def __init__(self, model: LlamaModel, calibration: torch.Tensor):
        self.model = model
        device = model.embed_tokens.weight.device
        length = calibration.shape[1]
        self.cos, self.sin = model.rope_cos[:length], model.rope_sin[:length]
        self.hidden = model.embed_tokens(calibration.to(device=device, dtype=torch.long))  # [S, T, d]

    def __enter__(self) -> _Pass:
        self.was_training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *_exc) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def compress_model(model: LlamaModel, calibration: torch.Tensor, *, sparsity: float | dict[str, float] = 0.0,
                   nm: tuple[int, int] | None = None, spec: TensorSpec | None = None, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False, layer_filter: Sequence[str] = PROJECTIONS,
                   chunk_size: int = 8, freeze: Recipe | None = None) -> dict[str, LayerSummary]:
    """Prune and/or quantize the block projections of ``model`` **in place** by GPTQ/SparseGPT, sequentially.

    calibration: token ids, integer ``[S, T]`` (``S >= 1``, ``T <= max_seq_len``, ids in ``[0, vocab_size)``).
    sparsity: one fraction in [0, 1) for every layer, or ``{module name: fraction}`` naming exactly the layers
        covered (``"layers.0.mlp.down_proj"``; e.g. from ``scheduler.schedule``).
    nm, spec, damp, block_size, act_order: as :func:`~bitlaw.compress.obs.compress_layer`, for every layer. With a
        quantized ``spec`` the written weight is the dequantized ``LayerResult.weight`` (rotated back when the spec
        rotates), which a plain linear then uses exactly (an fp32 weight; a bf16 weight holds it rounded to bf16).
    layer_filter: the projections of every block to compress, a subset of :data:`PROJECTIONS`; the others are left
        as they are (their inputs still change as the earlier layers are compressed).
    chunk_size: sequences per forward; bounds the activation memory of a capture.
    freeze: a recipe whose weight spec is ``spec``: every compressed layer is replaced by a
        :class:`~bitlaw.models.frozen_linear.FrozenQuantLinear` of this recipe holding the sweep's codes, steps and
        (with sparsity) mask, so the codes are kept exactly (and the native export stores them). The recipe's input
        spec then applies in the forward, so it must not quantize (GPTQ's Hessian is of the unquantized inputs).

    Covered layers must be ``nn.Linear`` or a ``QuantLinear`` with a bf16 recipe (ValueError otherwise). Each layer
    is swept with the Hessian of the inputs it receives once every earlier layer is compressed. With sparsity 0,
    no nm and no spec the weights come back bitwise, except the columns of dead inputs (always 0 on the calibration
    set), which the sweep sets to 0. Returns ``{module name: LayerSummary}`` in pass order. Raises ValueError for
    bad arguments before anything is computed or modified; the model's train/eval mode is restored.
    """
    _check_model_input(model, calibration, layer_filter, chunk_size)
    if freeze is not None and (spec is None or freeze.weight != spec or freeze.input.compressed):
        raise ValueError(f"freeze={freeze.name!r} is not allowed with spec={spec!r}; allowed: a recipe whose weight "
                         "spec is the quantized spec and whose input spec is bf16")
    names = _layer_names(model, layer_filter)
    if isinstance(sparsity, dict):
        if set(sparsity) != set(names):
            raise ValueError(f"the sparsity dict names unknown layers {sorted(set(sparsity) - set(names))} and "
                             f"misses layers {sorted(set(names) - set(sparsity))}; allowed: exactly the covered "
                             f"layers {names}")
        targets = dict(sparsity)
    else:
        targets = dict.fromkeys(names, sparsity)
    for name in names:
        weight = _linear(model, name).weight
        # A zero Hessian of the right shape (a view, no memory): check_arguments validates the arguments, not the data.
        hessian = torch.zeros((), dtype=torch.float64).expand(weight.shape[1], weight.shape[1])
        try:
            check_arguments(weight, hessian, spec, targets[name], nm, damp, block_size, act_order)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None

    summaries: dict[str, LayerSummary] = {}
    with _Pass(model, calibration) as run:
        for index, block in enumerate(model.layers):
            for group in GROUPS:
                members = [f"layers.{index}.{name}" for name in group if name in layer_filter]
                if not members:
                    continue
                hessian = _capture(block, {"group": model.get_submodule(members[0])}, run.hidden, run.cos, run.sin,
                                   chunk_size)["group"]
                for name in members:
                    module = model.get_submodule(name)
                    result = compress_layer(module.weight, hessian.hessian, spec=spec, sparsity=targets[name], nm=nm,
                                            damp=damp, block_size=block_size, act_order=act_order)
                    if freeze is None:
                        module.weight.copy_(result.weight)
                    else:
                        step = result.step if result.step is not None else result.scale
                        mask = result.mask if result.sparsity > 0 else None
                        parent, _, attr = name.rpartition(".")
                        setattr(model.get_submodule(parent), attr, FrozenQuantLinear(
                            result.codes, step, freeze, module.bias, mask=mask, name=name).to(module.weight.device))
                    summaries[name] = LayerSummary(sparsity=result.sparsity, loss=result.loss,
                                                   params=module.weight.numel(), rows=hessian.rows)
            run.hidden = _block_outputs(block, run.hidden, run.cos, run.sin, chunk_size)
    return summaries


@torch.no_grad()
def layer_losses(model: LlamaModel, calibration: torch.Tensor, sparsity: float, damp: float = 0.01, *,
                 layer_filter: Sequence[str] = PROJECTIONS, chunk_size: int = 8) -> dict[str, float]:
    """``{module name: scheduler.layer_pruning_loss}`` of every covered projection at ``sparsity``, on the inputs
    of the dense (unmodified) model: the losses ``scheduler.schedule`` allocates per-layer sparsities from.

    Arguments as :func:`compress_model`; the model is not modified (its train/eval mode is restored). Block by
    block, so only one block's Hessians exist at a time. Raises ValueError for bad arguments before any work.
    """
    if not (isinstance(sparsity, int | float) and not isinstance(sparsity, bool) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity={sparsity!r} is not allowed; allowed: a fraction in [0, 1)")
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp={damp!r} is not allowed; allowed: a finite number >= 0 (0.01 in GPTQ)")
    return layer_statistics(model, calibration, lambda weight, hessian: layer_pruning_loss(weight, hessian,
                                                                                           sparsity, damp),
                            layer_filter=layer_filter, chunk_size=chunk_size)


@torch.no_grad()
def layer_statistics(model: LlamaModel, calibration: torch.Tensor,
                     statistic: Callable[[torch.Tensor, torch.Tensor], float], *,
                     layer_filter: Sequence[str] = PROJECTIONS, chunk_size: int = 8) -> dict[str, float]:
    """``{module name: statistic(weight [out, in], hessian [in, in])}`` of every covered projection, each Hessian
    (``H = 2XᵀX/N``) of the inputs the dense (unmodified) model gives it: what the per-layer allocations
    (``scheduler.schedule``'s losses, ``scheduler.owl``'s outlier ratios) are computed from.

    Arguments as :func:`compress_model`; the model is not modified (its train/eval mode is restored). Block by
    block, so only one block's Hessians exist at a time. Raises ValueError for bad arguments before any work.
    """
    _check_model_input(model, calibration, layer_filter, chunk_size)
    names = _layer_names(model, layer_filter)
    for name in names:
        _linear(model, name)

    values: dict[str, float] = {}
    with _Pass(model, calibration) as run:
        for index, block in enumerate(model.layers):
            groups = [[f"layers.{index}.{name}" for name in group if name in layer_filter] for group in GROUPS]
            groups = [members for members in groups if members]
            # Nothing is compressed, so one run of the block gives every group's inputs.
            hessians = _capture(block, {members[0]: model.get_submodule(members[0]) for members in groups},
                                run.hidden, run.cos, run.sin, chunk_size)
            for members in groups:
                for name in members:
                    values[name] = statistic(model.get_submodule(name).weight, hessians[members[0]].hessian)
            run.hidden = _block_outputs(block, run.hidden, run.cos, run.sin, chunk_size)
    return values
