"""ShortGPT block pruning: score each transformer block by its Block Influence and remove the least influential.

Method (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):

- **Block Influence.** A pre-norm block maps the residual stream ``x_in`` to ``x_out = x_in + f(x_in)``. When ``f``
  barely turns the stream, the block does little: ``BI_i = 1 − E_t[cos(x_in_i,t, x_out_i,t)]``, the expectation over
  every token ``t`` of a calibration set. ``BI`` lies in ``[0, 2]``; 0 means the block passes every hidden state
  through up to a positive factor.
- **Removal.** The ``n`` blocks of lowest ``BI`` are deleted outright; the residual stream then flows from the block
  before to the block after. The paper finds the deep blocks of large models the most redundant and removal
  competitive with structured pruning methods that need more machinery.
- **Healing.** Quality lost to removal is partly recovered by briefly fine-tuning the pruned model on ordinary
  language-model data (a ``bitlaw-train`` run started from the pruned checkpoint); nothing here trains.

Here the expectation weighs every token equally across all calibration batches (a sum over tokens divided by the
token count), so the scores do not depend on how the tokens are grouped into batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.llama import LlamaModel


@torch.no_grad()
def block_influence(model: LlamaModel, batches: Iterable[torch.Tensor]) -> list[float]:
    """``BI_i`` for every block ``i`` of ``model``, in block order (length ``config.n_layer``), each in ``[0, 2]``.

    ``batches``: token ids, each int64 ``[B, T]`` (``T <= max_seq_len``; batches may differ in ``B`` and ``T``).
    The cosine between the hidden state entering and leaving a block is taken per token, in float64, and averaged
    over all tokens of all batches with equal weight per token. The model runs in eval mode for the duration and
    is left in the mode it had. ValueError when ``batches`` holds no token.
    """
    n_layer = len(model.layers)
    cos_sums = torch.zeros(n_layer, dtype=torch.float64)
    tokens = 0

    def record(index: int):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            cos = F.cosine_similarity(args[0].double(), output.double(), dim=-1)  # [B, T]
            cos_sums[index] += cos.sum().cpu()
        return hook

    # Hooks on the blocks read exactly what LlamaModel.forward feeds them, without re-implementing its loop.
    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(model.layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if batch.dim() != 2:
                raise ValueError(f"block_influence: each batch must be token ids [B, T], got shape "
                                 f"{tuple(batch.shape)}")
            model(batch)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("block_influence: the calibration batches hold no token")
    return (1.0 - cos_sums / tokens).tolist()


def lowest_influence(bi: list[float], n: int) -> list[int]:
    """Indices of the ``n`` blocks of lowest influence in ``bi``, sorted ascending; ties go to the lower index.

    ValueError unless ``0 <= n < len(bi)`` (at least one block must remain), naming ``n`` and the block count.
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < len(bi):
        raise ValueError(f"lowest_influence: cannot remove n={n!r} of {len(bi)} blocks; allowed: an int with "
                         f"0 <= n < {len(bi)} (at least one block must remain)")
    ranked = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    return sorted(ranked[:n])


def remove_blocks(model: LlamaModel, indices: Iterable[int]) -> LlamaModel:
    """Delete the blocks at ``indices`` from ``model`` **in place** and return it.

    The kept blocks keep their order and parameters; ``model.config`` becomes a copy with ``n_layer`` set to the
    number kept. Blocks do not store their position: ``LlamaModel.forward`` numbers them as it iterates, so the
    KV-cache slots of the kept blocks are again ``0 … n_layer − 1`` and ``make_cache`` sizes caches for the new
    depth. Layers that record their module path in ``layer_name`` (``QuantLinear``, ``FrozenQuantLinear``) get the
    new one, so their messages name the right block.

    ValueError for an index that is not an int in ``[0, n_layer)``, a repeated index, or removing every block.
    """
    indices = list(indices)
    n_layer = len(model.layers)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"remove_blocks: indices {bad!r} are not block indices; allowed: ints in [0, {n_layer})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"remove_blocks: indices {indices!r} repeat a block")
    if len(indices) >= n_layer:
        raise ValueError(f"remove_blocks: removing {len(indices)} of {n_layer} blocks leaves none; at least one "
                         "must remain")
    removed = set(indices)
    kept = [block for i, block in enumerate(model.layers) if i not in removed]
    model.layers = nn.ModuleList(kept)
    model.config = dataclasses.replace(model.config, n_layer=len(kept))
    for new_index, block in enumerate(kept):
        for name, module in block.named_modules():
            if hasattr(module, "layer_name"):
                module.layer_name = f"layers.{new_index}.{name}"
    return model
