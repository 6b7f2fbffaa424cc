"""The stages of ``bitlaw-compress``, each changing a LlamaModel in place and returning what the report records.

Each stage takes its settings as the checked dict of its config group (see :mod:`bitlaw.compress.cli`) and the
calibration windows ``[S, T]`` (int64 token ids of the training split).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..kernels.recipe import Recipe, TensorSpec
from ..kernels.sparsity import magnitude_keep
from ..models.llama import LlamaModel
from . import scheduler
from .pv import PVTuner, to_pv
from .sequential import compress_model, layer_losses, layer_statistics
from .shortgpt import block_influence, lowest_influence, remove_blocks


def blocks_to_remove(settings: dict[str, Any], n_layer: int) -> int:
    """How many blocks the ShortGPT stage removes from a model of ``n_layer`` blocks: ``blocks`` if set, else
    ``round(fraction · n_layer)`` (at least 1). ValueError naming both numbers when that leaves no block."""
    count = settings["blocks"] if settings["blocks"] is not None else max(1, round(settings["fraction"] * n_layer))
    if count >= n_layer:
        what = f"blocks={count}" if settings["blocks"] is not None else f"fraction={settings['fraction']} → {count}"
        raise ValueError(f"shortgpt.{what} blocks to remove, but the model has {n_layer}; allowed: fewer than "
                         f"{n_layer} (at least one block must remain)")
    return count


def shortgpt(model: LlamaModel, calibration: torch.Tensor, settings: dict[str, Any], chunk_size: int
             ) -> dict[str, Any]:
    """Remove the lowest-BI blocks; returns ``{"block_influence": [per block], "removed": [indices]}``."""
    influence = block_influence(model, calibration.split(chunk_size))
    removed = sorted(lowest_influence(influence, blocks_to_remove(settings, len(model.layers))))
    remove_blocks(model, removed)
    return {"block_influence": influence, "removed": removed}


def weight_spec(gptq: dict[str, Any]) -> TensorSpec:
    """The TensorSpec GPTQ rounds onto, from the ``gptq`` group (format, scale, rotation, block)."""
    fields = {"format": gptq["format"], "scale": gptq["scale"], "rotation": gptq["rotation"]}
    if gptq["rotation"] == "hadamard":
        fields["block"] = gptq["block"]
    return TensorSpec.from_dict(fields, "gptq")


def gptq_recipe(gptq: dict[str, Any], base: Recipe) -> Recipe:
    """The recipe of GPTQ's frozen layers: the GPTQ weight spec, the inputs as ``base`` (which must not quantize
    them: GPTQ's Hessian is of the unquantized inputs)."""
    if base.input.compressed:
        raise ValueError(f"gptq: the model's recipe {base.name!r} quantizes its inputs ({base.input.format}); GPTQ "
                         "here compresses models with high-precision layers (a bf16 recipe); PV-tune a "
                         "quantization-aware-trained model directly (pv=default)")
    spec = weight_spec(gptq)
    rotation = f"_had{spec.block}" if spec.rotated else ""
    return Recipe(name=f"gptq_{spec.format}{rotation}", weight=spec, input=base.input)


def allocation(model: LlamaModel, calibration: torch.Tensor, prune: dict[str, Any], chunk_size: int
               ) -> tuple[dict[str, float] | float, dict[str, float] | None]:
    """``(sparsities, statistics)``: a float for ``uniform``, else ``{layer: sparsity}`` from the scheduler's OBS
    losses or OWL's outlier ratios (``statistics``: those per-layer values, on the dense model's inputs)."""
    target = prune["sparsity"]
    if prune["allocation"] == "uniform":
        return target, None
    if prune["allocation"] == "scheduled":
        losses = layer_losses(model, calibration, target, prune["damp"], chunk_size=chunk_size)
        sizes = {name: model.get_submodule(name).weight.numel() for name in losses}
        return scheduler.schedule(losses, sizes, target, prune["clusters"], prune["spread"],
                                  prune["max_sparsity"]), losses
    ratios = layer_statistics(model, calibration,
                              lambda weight, hessian: scheduler.outlier_ratio(weight, hessian,
                                                                              prune["owl_threshold"]),
                              chunk_size=chunk_size)
    sizes = {name: model.get_submodule(name).weight.numel() for name in ratios}
    return scheduler.owl(ratios, sizes, target, prune["owl_lambda"]), ratios


@torch.no_grad()
def magnitude(model: LlamaModel, sparsities: dict[str, float] | float, nm: tuple[int, int] | None
              ) -> dict[str, float]:
    """Zero the smallest-magnitude entries of every row (N:M: of every M consecutive entries of a row) of each block
    projection; returns ``{layer: realised sparsity}``."""
    realised = {}
    for name, module in model.named_modules():
        if not name.startswith("layers.") or not isinstance(module, torch.nn.Linear):
            continue
        target = sparsities if isinstance(sparsities, float | int) else sparsities[name]
        keep = magnitude_keep(module.weight, f"{nm[0]}:{nm[1]}" if nm else "row", target)
        module.weight.mul_(keep)
        realised[name] = 1.0 - keep.float().mean().item()
    return realised


def prune(model: LlamaModel, calibration: torch.Tensor, settings: dict[str, Any], gptq: dict[str, Any] | None,
          base: Recipe, chunk_size: int) -> tuple[dict[str, Any], Recipe | None]:
    """Prune the block projections (SparseGPT, with ``gptq`` in the same sweep; or magnitude). Returns the report
    entries and the recipe of the frozen layers (None: the layers stay plain)."""
    nm = tuple(int(part) for part in settings["nm"].split(":")) if settings["nm"] else None
    sparsities, statistics = (settings["sparsity"], None) if nm else allocation(model, calibration, settings,
                                                                                chunk_size)
    info: dict[str, Any] = {"allocation": settings["allocation"], "targets": sparsities, "statistics": statistics}
    if settings["method"] == "magnitude":
        info["realised"] = magnitude(model, sparsities, nm)
        return info, None
    recipe = gptq_recipe(gptq, base) if gptq else None
    summaries = compress_model(model, calibration, sparsity=0.0 if nm else sparsities, nm=nm,
                               spec=recipe.weight if recipe else None, damp=settings["damp"],
                               block_size=settings["block_size"],
                               act_order=bool(gptq and gptq["act_order"]), chunk_size=chunk_size, freeze=recipe)
    info["realised"] = {name: s.sparsity for name, s in summaries.items()}
    info["obs_loss"] = {name: s.loss for name, s in summaries.items()}
    return info, recipe


def gptq(model: LlamaModel, calibration: torch.Tensor, settings: dict[str, Any], base: Recipe, chunk_size: int
         ) -> tuple[dict[str, Any], Recipe]:
    """Quantize every block projection by GPTQ into frozen layers; returns the report entries and their recipe."""
    recipe = gptq_recipe(settings, base)
    summaries = compress_model(model, calibration, spec=recipe.weight, damp=settings["damp"],
                               block_size=settings["block_size"], act_order=settings["act_order"],
                               chunk_size=chunk_size, freeze=recipe)
    return {"obs_loss": {name: s.loss for name, s in summaries.items()}}, recipe


def pv(model: LlamaModel, calibration: torch.Tensor, selection: torch.Tensor, settings: dict[str, Any]
       ) -> dict[str, Any]:
    """PV-tune the quantized layers on the calibration windows, keeping the step of lowest loss on ``selection``;
    returns the tuner's history (``train_loss``, ``val_loss`` on the selection windows, ``best_step``)."""
    layers = to_pv(model)
    tuner = PVTuner(model, layers, lr_scale=settings["lr_scale"], lr_norm=settings["lr_norm"],
                    lr_embed=settings["lr_embed"], lr_v=settings["lr_v"], tau=settings["tau"], ste=settings["ste"])
    batch = settings["batch_size"]
    train = list(calibration.split(batch))
    history = tuner.tune(train, list(selection.split(batch)), settings["steps"], settings["mode"],
                         settings["select_every"])
    history["epochs"] = settings["steps"] / math.ceil(calibration.shape[0] / batch)
    return history
