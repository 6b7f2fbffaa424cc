"""What ``bitlaw-compress`` starts from: a bitlaw checkpoint, a native export, or a Hugging Face Llama directory,
always as a :class:`~bitlaw.models.llama.LlamaModel` whose layers the compression methods can change.

Hugging Face directories are read without transformers: ``config.json`` is checked to describe a model this
LlamaModel computes exactly (a ``llama`` with as many key/value heads as query heads, SwiGLU with SiLU, no biases,
default RoPE), and the safetensors weights are loaded by name (``model.`` prefix dropped; a tied ``lm_head`` is
the embedding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..deploy.load import LoadedModel, load_checkpoint, resolve_source
from ..deploy.manifest import CT_FORMAT, HF_FORMAT, MANIFEST_FILE, NATIVE_FORMAT, export_format, verify_export
from ..deploy.native import load_native
from ..kernels.recipe import Recipe
from ..models.llama import LlamaConfig, LlamaModel

ALLOWED = "a bitlaw checkpoint (*.ckpt or a run directory), a native export, or a Hugging Face Llama directory"


def load_source(source: str | Path) -> LoadedModel:
    """``source`` loaded on the CPU as a ``LlamaModel`` (``LoadedModel.model``). FileNotFoundError / ValueError
    naming the path and what is allowed for anything else: a compressed-tensors export, a directory that is not a
    Llama (its ``model_type``), a Llama variant this model does not compute (the field that differs)."""
    path = resolve_source(source)
    if path.is_file():
        return load_checkpoint(path)
    if (path / MANIFEST_FILE).is_file():
        fmt = export_format(path)
        if fmt == NATIVE_FORMAT:
            return load_native(path)
        if fmt == CT_FORMAT:
            raise ValueError(f"{path} is a compressed-tensors export; compress its checkpoint instead (allowed: "
                             f"{ALLOWED})")
        if fmt != HF_FORMAT:
            raise ValueError(f"{path}: unknown export format {fmt!r} (allowed: {ALLOWED})")
    if (path / "config.json").is_file():
        return load_hf_llama(path)
    raise FileNotFoundError(f"{path}: not {ALLOWED}")


def hf_llama_config(config: dict[str, Any], where: str) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face ``config.json`` (as a dict); ValueError naming the field when the model
    is not a Llama or is one this LlamaModel does not compute exactly."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{where} is not a Llama: model_type={model_type!r} (architectures "
                         f"{config.get('architectures')}); allowed: model_type 'llama'")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    expected = {"num_key_value_heads": heads, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "head_dim": hidden // heads}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported; allowed: {value!r} (bitlaw's Llama has "
                             "multi-head attention, SwiGLU with SiLU and no biases)")
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: rope_scaling={rope!r} is not supported; allowed: none (default RoPE)")
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return LlamaConfig(n_layer=config["num_hidden_layers"], d_model=hidden, n_head=heads,
                       vocab_size=config["vocab_size"], max_seq_len=config["max_position_embeddings"],
                       rope_theta=float(theta), norm_eps=config.get("rms_norm_eps", 1e-6),
                       mlp_hidden=config["intermediate_size"])


def load_hf_llama(directory: Path) -> LoadedModel:
    """A Hugging Face Llama directory (``config.json`` and ``model.safetensors`` or a sharded safetensors index) as
    a bf16-recipe LlamaModel in fp32; bitlaw's own Hugging Face exports are verified against their manifest first."""
    manifest = verify_export(directory, HF_FORMAT, ("config.json",)) if (directory / MANIFEST_FILE).is_file() else None
    config = hf_llama_config(json.loads((directory / "config.json").read_text(encoding="utf-8")),
                             str(directory / "config.json"))
    files = _weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    state = {(key if key.startswith("lm_head.") else key.removeprefix("model.")): value.float()
             for key, value in tensors.items() if not key.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()  # tie_word_embeddings
    model = LlamaModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("rope_")]
    if missing or unexpected:
        raise ValueError(f"{directory}: the weights do not fit a Llama of its config.json: missing {missing}, "
                         f"unexpected {unexpected}")
    tokenizer = directory / "tokenizer.json"
    return LoadedModel(model.eval(), config, Recipe(name="bf16"), tokenizer if tokenizer.is_file() else None, "hf",
                       directory, manifest is not None, manifest.data if manifest else None)


def _weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [directory / name for name in names]
    raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json (only "
                            "safetensors weights are read)")
