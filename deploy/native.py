"""The native export: packed quantized safetensors that reproduce the training-time quantized forward bitwise.

A directory with:
- ``model.safetensors``: high-precision tensors as trained (embeddings, norms, lm_head, unquantized layers) and,
  per quantized layer, ``<layer>.weight.codes`` (uint8 level-index fields of ``field_bits(levels)`` bits, the one
  encoding of :mod:`bitlaw.kernels.packing`), ``<layer>.weight.step`` (int formats, fp32 ``[out, 1]``) or
  ``<layer>.weight.scale`` (other grids), ``<layer>.input_lsq_scale`` when the input scale is learned;
- ``bitlaw.json``: format name and version, model config, recipe, per-layer code layout, sha256 of the tensor
  file (checked before loading), and the tokenizer file name;
- ``tokenizer.json`` when the run recorded one.
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

from bitlaw.data.shards import sha256_file
from bitlaw.deploy.load import LoadedModel
from bitlaw.deploy.staging import prepare_out, publish
from bitlaw.kernels.packing import code_to_index, field_bits, index_to_code, pack_fields, unpack_fields
from bitlaw.kernels.quantizers import dequantize, quantize, reference_linear_given_weight
from bitlaw.kernels.recipe import Recipe
from bitlaw.models.convert import quantized_layers
from bitlaw.models.llama import LlamaConfig, LlamaModel

NATIVE_FORMAT = "bitlaw-native"
NATIVE_VERSION = 1
META_FILE = "bitlaw.json"
TENSOR_FILE = "model.safetensors"


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


def export_native(loaded: LoadedModel, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the native export of ``loaded`` (a checkpoint model) to ``out``; return a size report (bytes)."""
    out = Path(out)
    staging = prepare_out(out, force)
    try:
        model, recipe = loaded.model, loaded.recipe
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
            key, values = ("step", res.step) if fmt.kind == "int" else ("scale", res.scale)
            tensors[f"{name}.weight.{key}"] = values.float().contiguous()
            if layer.input_lsq_scale is not None:
                tensors[f"{name}.input_lsq_scale"] = layer.input_lsq_scale.detach().cpu().float()
            layers[name] = {"shape": list(layer.weight.shape), "field_bits": bits, "scale_key": key}
            block_bytes += tensors[f"{name}.weight.codes"].numel() + 4 * values.numel()
            block_elems += layer.weight.numel()
        save_file(tensors, str(staging / TENSOR_FILE))
        tokenizer = None
        if loaded.tokenizer_path is not None and loaded.tokenizer_path.is_file():
            shutil.copyfile(loaded.tokenizer_path, staging / "tokenizer.json")
            tokenizer = "tokenizer.json"
        meta = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "model": loaded.config.to_dict(),
                "recipe": recipe.to_dict(), "layers": layers, "tokenizer": tokenizer,
                "sha256": {TENSOR_FILE: sha256_file(staging / TENSOR_FILE)}}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not qlayers:
        block_elems = sum(m.weight.numel() for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and n.startswith("layers."))
        block_bytes = block_elems * tensors[next(k for k in tensors if k.startswith("layers."))].element_size()
    return {"file_bytes": (out / TENSOR_FILE).stat().st_size, "block_weight_bytes": block_bytes,
            "block_weight_bytes_bf16": 2 * block_elems}


def load_native(directory: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a native export, verifying its format version and checksum before reading any tensor."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a native export: {META_FILE} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != NATIVE_FORMAT or meta.get("version") != NATIVE_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                         f"supported; this loader reads {NATIVE_FORMAT!r} version {NATIVE_VERSION}")
    tensor_path = directory / TENSOR_FILE
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path} is missing")
    actual = sha256_file(tensor_path)
    if actual != meta["sha256"][TENSOR_FILE]:
        raise ValueError(f"{tensor_path} is truncated or modified: sha256 {actual} does not match "
                         f"{meta['sha256'][TENSOR_FILE]} recorded in {META_FILE}")
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
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "native")
