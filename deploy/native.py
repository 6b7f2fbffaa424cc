"""The native export: packed quantized safetensors that reproduce the training-time quantized forward bitwise.

A directory with:
- ``model.safetensors``: high-precision tensors as trained (embeddings, norms, lm_head, unquantized layers) and,
  per quantized layer, ``<layer>.weight.codes`` (uint8 level-index fields of ``field_bits(levels)`` bits, the one
  encoding of :mod:`bitlaw.kernels.packing`), ``<layer>.weight.step`` (integer grids: QuEST's odd ``int{b}``,
  ``int{b}z``, ``int{b}s``; fp32 ``[out, 1]``) or ``<layer>.weight.scale`` (other grids), ``<layer>.input_lsq_scale``
  when the input scale is learned;
- ``tokenizer.json`` unless the export was made without one;
- ``bitlaw.json``, the manifest (:mod:`bitlaw.deploy.manifest`, format ``bitlaw-native`` version 2): model config,
  recipe, per-layer code layout (``layers``), the tokenizer file name (or null) and the size and sha256 of every
  other file, all checked before any tensor is read.
Loading rebuilds the weight values with the training arithmetic, so the logits equal the training model's
quantized forward bitwise on CPU with the reference backend.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitlaw.deploy.load import LoadedModel, run_summary
from bitlaw.deploy.manifest import FORMATS, MANIFEST_FILE, NATIVE_FORMAT, file_records, verify_export
from bitlaw.deploy.staging import staged
from bitlaw.kernels.packing import code_to_index, field_bits, index_to_code, pack_fields, unpack_fields
from bitlaw.kernels.quantizers import dequantize, quantize, reference_linear_given_weight
from bitlaw.kernels.recipe import Recipe, TensorSpec
from bitlaw.models.convert import quantized_layers
from bitlaw.models.llama import LlamaConfig, LlamaModel

TENSOR_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
NO_TOKENIZER_NOTE = ("exported without a tokenizer: generating text with this export, or evaluating it on --text, "
                     "needs --tokenizer PATH/tokenizer.json")


class QuantizedWeightLinear(nn.Module):
    """Inference linear layer of a native export: the weight is stored quantized and its values are fixed at load
    (``weight_values`` ``[out, in]``, in the rotated domain when the recipe rotates it); the input is quantized live,
    exactly as in training (:func:`bitlaw.kernels.quantizers.reference_linear_given_weight`)."""

    def __init__(self, weight_values: torch.Tensor, recipe: Recipe, input_lsq_scale: torch.Tensor | None):
        super().__init__()
        self.recipe = recipe
        self.register_buffer("weight_values", weight_values)
        self.register_buffer("input_lsq_scale", input_lsq_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_linear_given_weight(x, self.weight_values, self.recipe, None, self.input_lsq_scale)


def export_tokenizer(loaded: LoadedModel) -> Path | None:
    """The tokenizer file an export of ``loaded`` copies: ``loaded.tokenizer_path`` (None: the export has none);
    FileNotFoundError naming it when it is set but missing, raised before anything is written."""
    path = loaded.tokenizer_path
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} recorded for {loaded.source} does not exist (moved or "
                                "deleted data set?): pass --tokenizer PATH/tokenizer.json, or --no-tokenizer to "
                                "export without one (nothing was written)")
    return path


def write_manifest(staging: Path, loaded: LoadedModel, fmt: str, tokenizer: str | None, **extra: Any) -> None:
    """Write ``bitlaw.json`` into the finished ``staging`` directory, listing every file already in it."""
    meta = {"format": fmt, "version": FORMATS[fmt], "model": loaded.config.to_dict(),
            "recipe": loaded.recipe.to_dict(), "tokenizer": tokenizer, "data": loaded.data,
            "run": run_summary(loaded.source) if loaded.kind == "checkpoint" else None, **extra,
            "files": file_records(staging)}
    (staging / MANIFEST_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


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


def export_native(loaded: LoadedModel, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the native export of ``loaded`` (a checkpoint model) to ``out``; return a size report (bytes).

    The tokenizer is ``loaded.tokenizer_path`` (None: none, recorded as such). ``out`` follows
    :func:`bitlaw.deploy.staging.check_out` (``loaded.source`` is protected) and is replaced only once the new
    export is complete. ValueError before anything is written for weights it cannot store
    (:func:`check_native_recipe`).
    """
    out = Path(out)
    check_native_recipe(loaded.recipe)
    tokenizer = export_tokenizer(loaded)
    model, recipe = loaded.model, loaded.recipe
    with staged(out, force, loaded.source) as staging:
        qlayers = quantized_layers(model)
        skip = {f"{name}.{p}" for name in qlayers for p in ("weight", "weight_lsq_scale", "input_lsq_scale",
                                                            "lsq_initialized")}
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in skip}
        layers, block_bytes, block_elems = {}, 0, 0
        for name, layer in qlayers.items():
            spec = recipe.weight
            res = quantize(layer.weight.detach().cpu(), spec, layer.weight_lsq_scale)
            fmt = spec.fmt
            index = code_to_index(res.codes, fmt.bits) if fmt.kind == "int" else res.codes.long()
            bits = field_bits(len(fmt.levels))
            tensors[f"{name}.weight.codes"] = pack_fields(index, bits)
            key, values = ("step", res.step) if res.step is not None else ("scale", res.scale)
            tensors[f"{name}.weight.{key}"] = values.float().contiguous()
            if layer.input_lsq_scale is not None:
                tensors[f"{name}.input_lsq_scale"] = layer.input_lsq_scale.detach().cpu().float()
            layers[name] = {"shape": list(layer.weight.shape), "field_bits": bits, "scale_key": key}
            block_bytes += tensors[f"{name}.weight.codes"].numel() + 4 * values.numel()
            block_elems += layer.weight.numel()
        save_file(tensors, str(staging / TENSOR_FILE))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        write_manifest(staging, loaded, NATIVE_FORMAT, TOKENIZER_FILE if tokenizer else None, layers=layers)
    if not qlayers:
        block_elems = sum(m.weight.numel() for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and n.startswith("layers."))
        block_bytes = block_elems * tensors[next(k for k in tensors if k.startswith("layers."))].element_size()
    return {"file_bytes": (out / TENSOR_FILE).stat().st_size, "block_weight_bytes": block_bytes,
            "block_weight_bytes_bf16": 2 * block_elems}


def load_native(directory: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a native export after verifying its manifest (format version, and the size and sha256 of every file)
    before reading any tensor; ValueError / FileNotFoundError naming the file otherwise."""
    directory = Path(directory)
    meta = verify_export(directory, NATIVE_FORMAT, (TENSOR_FILE,))
    tensor_path = directory / TENSOR_FILE
    tensors = load_file(str(tensor_path))
    config, recipe = LlamaConfig.from_dict(meta["model"]), Recipe.from_dict(meta["recipe"])
    with torch.device("meta"):
        model = LlamaModel(config)
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables; every parameter is overwritten below
    for name, info in meta["layers"].items():
        out_features, in_features = info["shape"]
        index = unpack_fields(tensors.pop(f"{name}.weight.codes"), info["field_bits"], in_features)
        step_or_scale = tensors.pop(f"{name}.weight.{info['scale_key']}")
        fmt = recipe.weight.fmt
        codes = index_to_code(index, fmt.bits) if fmt.kind == "int" else index
        values = dequantize(codes, step_or_scale, fmt)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                QuantizedWeightLinear(values, recipe, tensors.pop(f"{name}.input_lsq_scale", None)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("weight_values", "input_lsq_scale"))]:
        raise ValueError(f"{tensor_path}: tensors do not match the model: missing {missing}, unexpected {unexpected}")
    tokenizer = directory / meta["tokenizer"] if meta.get("tokenizer") else None
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "native", directory, True,
                       meta.get("data"))
