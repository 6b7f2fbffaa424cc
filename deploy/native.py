"""The native export: packed quantized safetensors that reproduce the training-time quantized forward bitwise.

A directory with:
- ``model.safetensors``: high-precision tensors as trained (embeddings, norms, lm_head, unquantized layers) and,
  per quantized layer, ``<layer>.weight.codes`` (uint8 level-index fields of ``field_bits(levels)`` bits, the one
  encoding of :mod:`bitlaw.kernels.packing`), ``<layer>.weight.step`` (integer grids: QuEST's odd ``int{b}``,
  ``int{b}z``, ``int{b}s``; fp32 ``[out, 1]``) or ``<layer>.weight.scale`` (other grids), ``<layer>.weight.mask``
  (1 bit per entry, packed like the codes) when post-training pruning fixed a sparsity mask, ``<layer>.input_lsq_scale``
  when the input scale is learned;
- ``tokenizer.json`` unless the export was made without one;
- ``bitlaw.json``, the manifest (:mod:`bitlaw.deploy.manifest`, format ``bitlaw-native`` version 2): model config,
  recipe, per-layer code layout (``layers``), the tokenizer file name (or null) and the size and sha256 of every
  other file, all checked before any tensor is read.
Loading rebuilds each quantized layer as a :class:`~bitlaw.models.frozen_linear.FrozenQuantLinear` holding exactly
these tensors, whose values follow the training arithmetic, so the logits equal the training model's quantized forward
bitwise on CPU with the reference backend. The layers come from a checkpoint's ``QuantLinear`` layers (quantized from
their master weights) or from frozen layers (GPTQ and PV-tuning in ``bitlaw-compress``), stored as they are.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.records import EXPORT_FORMATS, ExportManifest
from ..kernels.formats import Format
from ..kernels.packing import code_to_index, field_bits, index_to_code, pack_fields, unpack_fields
from ..kernels.recipe import Recipe, TensorSpec
from ..models.convert import quantized_layers
from ..models.frozen_linear import FrozenQuantLinear, frozen_layers
from ..models.llama import LlamaConfig, LlamaModel
from .load import LoadedModel, training_run
from .manifest import MANIFEST_FILE, NATIVE_FORMAT, verify_export, write_manifest
from .staging import staged

TENSOR_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
NO_TOKENIZER_NOTE = ("exported without a tokenizer: generating text with this export, or evaluating it on --text, "
                     "needs --tokenizer PATH/tokenizer.json")


def export_tokenizer(loaded: LoadedModel) -> Path | None:
    """The tokenizer file an export of ``loaded`` copies: ``loaded.tokenizer_path`` (None: the export has none);
    FileNotFoundError naming it when it is set but missing, raised before anything is written."""
    path = loaded.tokenizer_path
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} recorded for {loaded.source} does not exist (moved or "
                                "deleted data set?): pass --tokenizer PATH/tokenizer.json, or --no-tokenizer to "
                                "export without one (nothing was written)")
    return path


def export_manifest(loaded: LoadedModel, fmt: str, tokenizer: str | None, **fields: Any) -> ExportManifest:
    """The manifest of an export of ``loaded`` in format ``fmt`` (its ``files`` are listed when it is written,
    :func:`~bitlaw.deploy.manifest.write_manifest`): the model, the recipe, the tokenizer's file name, the data set,
    the training run (of a checkpoint or native export; ``fields`` may set ``run`` itself), and the format's own
    ``fields`` (``layers``, ``storage``, ``measured``, ``compressed``)."""
    run = training_run(loaded.source) if loaded.kind in ("checkpoint", "native") else None
    return ExportManifest(**{"format": fmt, "version": EXPORT_FORMATS[fmt], "model": loaded.config.to_dict(),
                             "recipe": loaded.recipe.to_dict(), "files": {}, "tokenizer": tokenizer,
                             "data": loaded.data, "run": run, **fields})


def compression_fields(spec: TensorSpec) -> list[str]:
    """The sparsity, group and outlier fields ``spec`` sets (docs/numerics.md §7): what packed codes with one scale
    per row do not describe."""
    return [name for name, used in (("sparsity", spec.sparse), ("group", spec.group is not None),
                                    ("outliers", spec.outliers > 0)) if used]


def check_native_recipe(recipe: Recipe) -> None:
    """ValueError naming the field for weights the native layout cannot hold exactly (sparse, grouped or with
    outliers). Inputs are quantized live by the loader with the training code, so their fields are exact."""
    fields = compression_fields(recipe.weight)
    if fields:
        raise ValueError(f"recipe {recipe.name!r}: weight {' and '.join(fields)} {'is' if len(fields) == 1 else 'are'} "
                         "not supported by the native export yet; --format hf writes the weights exactly as trained "
                         "(nothing was written)")


def export_native(loaded: LoadedModel, out: str | Path, force: bool = False, extra: dict[str, Any] | None = None,
                  write_extra: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write the native export of ``loaded`` (a checkpoint model) to ``out``; return a size report (bytes).

    The tokenizer is ``loaded.tokenizer_path`` (None: none, recorded as such). ``out`` follows
    :func:`bitlaw.deploy.staging.check_out` (``loaded.source`` is protected) and is replaced only once the new
    export is complete. ``extra``: more manifest fields (``bitlaw-compress`` records its stages);
    ``write_extra(staging)``: writes more files into the export (a report) once the tensors are written, before the
    manifest lists every file. ValueError before anything is written for weights it cannot store
    (:func:`check_native_recipe`).
    """
    out = Path(out)
    check_native_recipe(loaded.recipe)
    tokenizer = export_tokenizer(loaded)
    model = loaded.model
    with staged(out, force, loaded.source) as staging:
        stored = stored_layers(model, loaded.recipe)
        skip = {f"{name}.{leaf}" for name in stored for leaf in _QUANTIZER_LEAVES}
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in skip}
        layers, block_bytes, block_elems = {}, 0, 0
        fmt = loaded.recipe.weight.fmt
        for name, layer in stored.items():
            index = code_to_index(layer.codes, fmt.bits) if fmt.kind == "int" else layer.codes.long()
            bits = field_bits(len(fmt.levels))
            key = "step" if fmt.kind in ("int", "intz") else "scale"
            tensors[f"{name}.weight.codes"] = pack_fields(index.cpu(), bits)
            tensors[f"{name}.weight.{key}"] = layer.step.detach().float().contiguous().cpu()
            if layer.mask is not None:
                tensors[f"{name}.weight.mask"] = pack_fields(layer.mask.to(torch.uint8).cpu(), 1)
            if layer.input_lsq_scale is not None:
                tensors[f"{name}.input_lsq_scale"] = layer.input_lsq_scale.detach().float().cpu()
            layers[name] = {"shape": list(layer.codes.shape), "field_bits": bits, "scale_key": key,
                            "mask": layer.mask is not None}
            block_bytes += packed_layer_bytes(*layer.codes.shape, fmt, layer.mask is not None)
            block_elems += layer.codes.numel()
        save_file(tensors, str(staging / TENSOR_FILE))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        if write_extra is not None:
            write_extra(staging)
        write_manifest(staging, export_manifest(loaded, NATIVE_FORMAT, TOKENIZER_FILE if tokenizer else None,
                                                layers=layers, **(extra or {})))
    plain = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")
             and n not in stored]
    for module in plain:
        block_elems += module.weight.numel()
        block_bytes += module.weight.numel() * module.weight.element_size()
    return {"file_bytes": (out / TENSOR_FILE).stat().st_size, "block_weight_bytes": block_bytes,
            "block_weight_bytes_bf16": 2 * block_elems}


def packed_layer_bytes(out_features: int, in_features: int, fmt: Format, masked: bool) -> int:
    """Bytes of one quantized ``[out, in]`` weight in the native layout: its codes packed row by row in
    ``field_bits(levels)``-bit fields, one fp32 step (or scale) per row, and a 1-bit-per-entry mask when
    ``masked``."""
    row_bytes = math.ceil(in_features * field_bits(len(fmt.levels)) / 8)
    return out_features * (row_bytes + 4 + (math.ceil(in_features / 8) if masked else 0))


# A quantized layer's tensors that the native layout replaces by its packed codes, steps and mask.
_QUANTIZER_LEAVES = ("weight", "weight_lsq_scale", "input_lsq_scale", "lsq_initialized", "codes", "step", "mask")


@torch.no_grad()
def stored_layers(model: nn.Module, recipe: Recipe) -> dict[str, FrozenQuantLinear]:
    """``{module name: frozen layer}`` of what the native export stores for every quantized layer of ``model``: a
    ``QuantLinear`` quantized from its master weight (:meth:`FrozenQuantLinear.from_quant_linear`), a
    ``FrozenQuantLinear`` as it is. ValueError naming the layer when one follows another recipe than ``recipe``."""
    found = {name: FrozenQuantLinear.from_quant_linear(module, name)
             for name, module in quantized_layers(model).items()}
    found.update(frozen_layers(model))
    for name, layer in found.items():
        if layer.recipe != recipe:
            raise ValueError(f"layer {name!r} follows recipe {layer.recipe.name!r}, not the model's {recipe.name!r}: "
                             "the native export stores one recipe (nothing was written)")
    return {name: found[name] for name, _ in model.named_modules() if name in found}


def load_native(directory: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a native export after verifying its manifest (format version, and the size and sha256 of every file)
    before reading any tensor; ValueError / FileNotFoundError naming the file otherwise."""
    directory = Path(directory)
    manifest = verify_export(directory, NATIVE_FORMAT, (TENSOR_FILE,))
    if manifest.layers is None:
        raise ValueError(f"{directory / MANIFEST_FILE} has no 'layers' entry: the export is damaged; export it again")
    tensor_path = directory / TENSOR_FILE
    tensors = load_file(str(tensor_path))
    config, recipe = LlamaConfig.from_dict(manifest.model), Recipe.from_dict(manifest.recipe)
    with torch.device("meta"):
        model = LlamaModel(config)
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables; every parameter is overwritten below
    fmt = recipe.weight.fmt
    for name, info in manifest.layers.items():
        out_features, in_features = info["shape"]
        index = unpack_fields(tensors.pop(f"{name}.weight.codes"), info["field_bits"], in_features)
        codes = index_to_code(index, fmt.bits) if fmt.kind == "int" else index
        mask = unpack_fields(tensors.pop(f"{name}.weight.mask"), 1, in_features).bool() if info.get("mask") else None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                FrozenQuantLinear(codes, tensors.pop(f"{name}.weight.{info['scale_key']}"), recipe,
                                  tensors.pop(f"{name}.bias", None), tensors.pop(f"{name}.input_lsq_scale", None),
                                  mask, name))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    frozen = frozen_layers(model)
    if unexpected or [k for k in missing if k.rpartition(".")[0] not in frozen]:
        raise ValueError(f"{tensor_path}: tensors do not match the model: missing {missing}, unexpected {unexpected}")
    tokenizer = directory / manifest.tokenizer if manifest.tokenizer else None
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "native", directory, True, manifest.data)
