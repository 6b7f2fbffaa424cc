"""``convert``: the one place where a model's ``nn.Linear`` layers are swapped for quantized ones.

Training drives it through :class:`bitlaw.models.converter.RecipeConverter`, which also sets the layers' kernel
backend and keeps their per-step sparsity and statistics bookkeeping.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ..kernels.recipe import Recipe
from .quant_linear import QuantLinear

# Every projection inside a transformer block (docs/training.md §2); never embeddings or lm_head.
BLOCK_PROJECTIONS = r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"

LayerFilter = Callable[[str, nn.Module], bool] | str


def layer_matcher(layer_filter: LayerFilter) -> Callable[[str, nn.Module], bool]:
    """``layer_filter`` as a predicate ``(module name, module) -> selected``: a regex must match the whole name."""
    if callable(layer_filter):
        return layer_filter
    pattern = re.compile(layer_filter)
    return lambda name, _module: pattern.fullmatch(name) is not None


def convert(model: nn.Module, recipe: Recipe, layer_filter: LayerFilter = BLOCK_PROJECTIONS) -> nn.Module:
    """Swap the linear layers of ``model`` selected by ``layer_filter`` to follow ``recipe``, in place.

    ``layer_filter``: a regex that must match the whole module name (default: the block projections) or a
    callable ``(name, module) -> bool``. Selected ``nn.Linear`` layers become :class:`QuantLinear` sharing the
    same parameter objects (so it works on the meta device and before FSDP/DDP wrapping); selected
    ``QuantLinear`` layers get the new recipe. A recipe that neither quantizes nor sparsifies anything (``bf16``)
    turns selected layers back into plain ``nn.Linear``. Idempotent. Returns ``model``.

    Raises ValueError if the filter selects no linear layer, or (naming the layer) if a Hadamard block, an N:M
    group or a scale group does not divide a selected layer's ``in_features`` — before any layer is swapped.
    """
    match = layer_matcher(layer_filter)
    selected = [(name, module) for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and match(name, module)]
    if not selected:
        raise ValueError(f"convert: the filter {layer_filter!r} selects no nn.Linear layer of "
                         f"{type(model).__name__}")
    for name, module in selected:
        recipe.check_in_features(module.in_features, name)
    for name, module in selected:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, QuantLinear):
            if module.recipe == recipe:
                continue
            module = module.to_linear()
        if recipe.compressed:
            setattr(parent, attr, QuantLinear.from_linear(module, recipe, name))
        else:
            setattr(parent, attr, module)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's :class:`QuantLinear` layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
