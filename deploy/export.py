"""Export trained models (native packed safetensors, Hugging Face ``LlamaForCausalLM``) and load any of them.

Native export (``--format native``), a directory with:
- ``model.safetensors``: high-precision tensors as trained (embeddings, norms, lm_head, unquantized layers) and,
  per quantized layer, ``<layer>.weight.codes`` (uint8, level indices packed 8 per byte for 2-level grids,
  4 per byte for ≤ 4 levels, 2 per byte for ≤ 16, else 1 per byte), ``<layer>.weight.step`` (int formats,
  fp32 ``[out, 1]``) or ``<layer>.weight.scale`` (other grids), ``<layer>.input_lsq_scale`` when the input
  scale is learned;
- ``bitlaw.json``: format name and version, model config, recipe, per-layer code layout, sha256 of the tensor
  file (checked before loading), and the tokenizer file name;
- ``tokenizer.json`` when the run recorded one.
Loading rebuilds the weight values with the training arithmetic, so the logits equal the training model's
quantized forward bitwise on CPU with the reference backend.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitlaw.kernels.packing import pack_fields, unpack_fields
from bitlaw.kernels.quantizers import dequantize, linear_from_quantized_weight, quantize, unrotate
from bitlaw.kernels.recipe import Recipe
from bitlaw.models.convert import convert, quantized_layers
from bitlaw.models.llama import LlamaConfig, LlamaModel
from bitlaw.data.shards import sha256_file

NATIVE_FORMAT = "bitlaw-native"
NATIVE_VERSION = 1
META_FILE = "bitlaw.json"
TENSOR_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    """A model ready for inference, whatever it was loaded from.

    model: eval mode; ``forward(input_ids [B, T] int64, targets=None)`` → logits ``[B, T, V]`` or
        ``(logits, loss)``; a :class:`LlamaModel` for ``checkpoint`` and ``native``.
    """

    model: nn.Module
    config: LlamaConfig
    recipe: Recipe
    tokenizer_path: Path | None
    kind: str  # "checkpoint" | "native" | "hf"


def code_bits(n_levels: int) -> int:
    """Storage bits per code (a divisor of 8): 1 for 2 levels, 2 for ≤ 4, 4 for ≤ 16, else 8."""
    return next(bits for bits in (1, 2, 4, 8) if n_levels <= 2**bits)


class PackedLinear(nn.Module):
    """Inference linear layer of a native export: quantized weight values fixed at load, inputs quantized live."""

    def __init__(self, weight_values: torch.Tensor, recipe: Recipe, input_lsq_scale: torch.Tensor | None):
        super().__init__()
        self.recipe = recipe
        self.register_buffer("weight_values", weight_values)
        self.register_buffer("input_lsq_scale", input_lsq_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_from_quantized_weight(x, self.weight_values, self.recipe, None, self.input_lsq_scale)


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedModel:
    """A training checkpoint (``*.ckpt`` written by ``bitlaw-train``) as a quantized :class:`LlamaModel`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "bitlaw" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a bitlaw-train checkpoint (no 'bitlaw' and 'state_dict' entries)")
    info = ckpt["bitlaw"]
    config, recipe = LlamaConfig.from_dict(info["model"]), Recipe.from_dict(info["recipe"])
    model = LlamaModel(config)
    if recipe.quantized:
        convert(model, recipe)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    tokenizer = Path(info["tokenizer"]) if info.get("tokenizer") else None
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "checkpoint")


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def _publish(staging: Path, out: Path) -> None:
    # The old export is removed only once the new one is completely written beside it.
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def export_native(loaded: LoadedModel, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the native export of ``loaded`` (a checkpoint model) to ``out``; return a size report (bytes)."""
    out = Path(out)
    staging = _prepare_out(out, force)
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
            index = (res.codes.long() + (2**fmt.bits - 1)) // 2 if fmt.kind == "int" else res.codes.long()
            bits = code_bits(len(fmt.levels))
            tensors[f"{name}.weight.codes"] = pack_fields(index, bits)
            key, values = ("step", res.step) if fmt.kind == "int" else ("scale", res.scale)
            tensors[f"{name}.weight.{key}"] = values.float().contiguous()
            if layer.input_lsq_scale is not None:
                tensors[f"{name}.input_lsq_scale"] = layer.input_lsq_scale.detach().cpu().float()
            layers[name] = {"shape": list(layer.weight.shape), "code_bits": bits, "scale_key": key}
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
        _publish(staging, out)
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
        index = unpack_fields(tensors.pop(f"{name}.weight.codes"), info["code_bits"], in_features)
        step_or_scale = tensors.pop(f"{name}.weight.{info['scale_key']}")
        fmt = recipe.weight.fmt
        codes = 2 * index - (2**fmt.bits - 1) if fmt.kind == "int" else index
        values = dequantize(codes, step_or_scale, fmt)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                PackedLinear(values, recipe, tensors.pop(f"{name}.input_lsq_scale", None)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("weight_values", "input_lsq_scale"))]:
        raise ValueError(f"{tensor_path}: tensors do not match the model: missing {missing}, unexpected {unexpected}")
    tokenizer = directory / meta["tokenizer"] if meta.get("tokenizer") else None
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "native")


def hf_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensor names → fp32 tensors, quantized weights dequantized and rotated back."""
    model, recipe = loaded.model, loaded.recipe
    qlayers = quantized_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in qlayers:
            if leaf != "weight":
                continue  # learned quantizer scales have no place in a plain Llama
            layer = qlayers[module_name]
            res = quantize(layer.weight.detach().cpu().float(), recipe.weight, layer.weight_lsq_scale)
            value = unrotate(res.values, recipe.weight)
        name = key if key.startswith("lm_head.") else f"model.{key}"
        out[name] = value.detach().float().contiguous().cpu()
    return out


def hf_config(config: LlamaConfig, eos_id: int | None) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM``, every field mapped explicitly."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": config.init_std, "bos_token_id": None, "eos_token_id": eos_id,
        "pad_token_id": None, "dtype": "float32", "use_cache": True,
    }


def export_hf(loaded: LoadedModel, out: str | Path, force: bool = False) -> list[str]:
    """Write a directory ``transformers.LlamaForCausalLM`` loads offline; return notes for the user."""
    out = Path(out)
    notes = []
    if loaded.recipe.input.quantized:
        notes.append(f"recipe {loaded.recipe.name!r} quantizes activations ({loaded.recipe.input.format}); the Hugging "
                     "Face export has weight-only semantics: activations run in high precision there")
    staging = _prepare_out(out, force)
    try:
        eos_id = None
        if loaded.tokenizer_path is not None and loaded.tokenizer_path.is_file():
            from tokenizers import Tokenizer

            eos_id = Tokenizer.from_file(str(loaded.tokenizer_path)).token_to_id("<|endoftext|>")
            shutil.copyfile(loaded.tokenizer_path, staging / "tokenizer.json")
            (staging / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                "model_max_length": loaded.config.max_seq_len}, indent=2) + "\n")
        else:
            notes.append("no tokenizer recorded for this model: tokenizer files were not written")
        save_file(hf_state_dict(loaded), str(staging / TENSOR_FILE), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config(loaded.config, eos_id), indent=2) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return notes


class _HFWrapper(nn.Module):
    """``LlamaForCausalLM`` behind the :class:`LlamaModel` call contract (fp32 logits, optional loss)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf_model(input_ids=input_ids).logits.float()
        if targets is None:
            return logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss


def load_hf(directory: str | Path, device: str = "cpu") -> LoadedModel:
    """A Hugging Face export directory, loaded offline with ``transformers`` (the ``hf`` extra)."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError as err:
        raise ImportError("loading a Hugging Face export needs transformers: pip install 'bitlaw[hf]'") from err
    directory = Path(directory)
    hf_model = LlamaForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    c = hf_model.config
    config = LlamaConfig(n_layer=c.num_hidden_layers, d_model=c.hidden_size, n_head=c.num_attention_heads,
                         vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                         mlp_hidden=c.intermediate_size)
    tokenizer = directory / "tokenizer.json"
    return LoadedModel(_HFWrapper(hf_model).to(device).eval(), config, Recipe(name="bf16"),
                       tokenizer if tokenizer.is_file() else None, "hf")


def load_model(source: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a training checkpoint (``*.ckpt``), a native export or a Hugging Face export directory."""
    source = Path(source)
    if source.is_file():
        return load_checkpoint(source, device)
    if (source / META_FILE).is_file():
        return load_native(source, device)
    if (source / "config.json").is_file():
        return load_hf(source, device)
    raise FileNotFoundError(f"{source}: not a checkpoint file, a native export ({META_FILE}) or a Hugging Face "
                            "export (config.json)")


def main(argv: list[str] | None = None) -> int:
    """``bitlaw-export CKPT --format native|hf --out DIR [--force]``."""
    parser = argparse.ArgumentParser(prog="bitlaw-export", description="Export a bitlaw-train checkpoint.")
    parser.add_argument("checkpoint", help="a bitlaw-train checkpoint, e.g. runs/<run>/checkpoints/last.ckpt")
    parser.add_argument("--format", choices=["native", "hf"], required=True,
                        help="native: packed quantized safetensors; hf: a transformers LlamaForCausalLM directory")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} already exists; pass --force to replace it (nothing was written)")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
        loaded = load_checkpoint(args.checkpoint)
        if args.format == "native":
            sizes = export_native(loaded, out, args.force)
            ratio = sizes["block_weight_bytes"] / sizes["block_weight_bytes_bf16"]
            print(f"wrote {out} ({sizes['file_bytes']:,} bytes); block weights {sizes['block_weight_bytes']:,} bytes = "
                  f"{ratio:.3f}x of bf16 ({sizes['block_weight_bytes_bf16']:,} bytes)")
        else:
            for note in export_hf(loaded, out, args.force):
                print(f"note: {note}")
            print(f"wrote {out}: load it with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"bitlaw-export: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
