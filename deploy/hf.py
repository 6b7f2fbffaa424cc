"""The Hugging Face export: a ``transformers.LlamaForCausalLM`` directory with the quantized weights dequantized and
rotated back (weight-only semantics; a ``layout='rotated'`` recipe's weight ``Q(W·H)`` is already the plain weight
it multiplies the input by, so it is written as it is, exactly), and its loader.

The directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json`` (unless
exported without a tokenizer) and ``bitlaw.json``, the manifest (:mod:`bitlaw.deploy.manifest`, format
``bitlaw-hf`` version 1) with the size and sha256 of every other file; ``transformers`` ignores it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..kernels.quantizers import unrotate
from ..kernels.recipe import Recipe
from ..models.convert import quantized_layers
from ..models.frozen_linear import frozen_layers
from ..models.llama import LlamaConfig
from .load import LoadedModel
from .manifest import HF_FORMAT, MANIFEST_FILE, verify_export, write_manifest
from .native import NO_TOKENIZER_NOTE, TENSOR_FILE, TOKENIZER_FILE, export_manifest, export_tokenizer
from .staging import staged


def hf_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensor names → fp32 tensors, quantized weights dequantized and rotated back (kept rotated
    for ``layout='rotated'``, which is what that layer multiplies by): a ``QuantLinear``'s as its forward quantizes
    them, a ``FrozenQuantLinear``'s from its codes, steps and mask."""
    model, recipe = loaded.model, loaded.recipe
    qlayers, frozen = quantized_layers(model), frozen_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in qlayers:
            if leaf != "weight":
                continue  # learned quantizer scales have no place in a plain Llama
            layer = qlayers[module_name]
            res = layer.quantized_weight()  # the forward's own values: sparsity (RigL's mask too), groups, outliers
            value = unrotate(res.values, recipe.weight) if recipe.layout == "rotate_back" else res.values
        elif module_name in frozen:
            if leaf != "codes":
                continue  # steps and mask are in the dense weight written for "codes"
            key, value = f"{module_name}.weight", frozen[module_name].dense_weight().detach()
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


def write_hf_tokenizer(directory: Path, tokenizer: Path | None, max_seq_len: int) -> int | None:
    """Copy ``tokenizer`` (a tokenizers ``tokenizer.json``) into ``directory`` with the ``tokenizer_config.json``
    transformers' ``AutoTokenizer`` reads; return its end-of-text id for ``config.json`` (None without one)."""
    if tokenizer is None:
        return None
    shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "model_max_length": max_seq_len}, indent=2) + "\n")
    return tokenizer_eos_id(tokenizer)


def export_hf(loaded: LoadedModel, out: str | Path, force: bool = False) -> list[str]:
    """Write a directory ``transformers.LlamaForCausalLM`` loads offline; return notes for the user.

    The tokenizer is ``loaded.tokenizer_path`` (None: none, recorded as such). ``out`` follows
    :func:`bitlaw.deploy.staging.check_out` (``loaded.source`` is protected) and is replaced only once the new
    export is complete.
    """
    out = Path(out)
    tokenizer = export_tokenizer(loaded)
    notes = []
    if loaded.recipe.input.compressed:
        spec = loaded.recipe.input
        what = f"{spec.format}" + (f", sparsity {spec.realised_sparsity:g}" if spec.sparse else "")
        notes.append(f"recipe {loaded.recipe.name!r} quantizes activations ({what}); the Hugging Face export has "
                     "weight-only semantics: activations run in high precision there")
    with staged(out, force, loaded.source) as staging:
        eos_id = write_hf_tokenizer(staging, tokenizer, loaded.config.max_seq_len)
        if tokenizer is None:
            notes.append(NO_TOKENIZER_NOTE)
        save_file(hf_state_dict(loaded), str(staging / TENSOR_FILE), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config(loaded.config, eos_id), indent=2) + "\n")
        write_manifest(staging, export_manifest(loaded, HF_FORMAT, TOKENIZER_FILE if tokenizer else None))
    return notes


def tokenizer_eos_id(path: Path) -> int | None:
    """The id of ``<|endoftext|>`` in the tokenizer file at ``path`` (None: it has none), for ``config.json``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).token_to_id("<|endoftext|>")


def wrap_transformers_model(hf_model: nn.Module) -> nn.Module:
    """A transformers causal LM behind the :class:`LlamaModel` call contract, in eval mode."""
    return _HFWrapper(hf_model).eval()


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
    """A Hugging Face export directory, loaded offline with ``transformers`` (the ``hf`` extra).

    One written by bitlaw (it holds ``bitlaw.json``) is verified first — every file's size and sha256 — and
    ValueError / FileNotFoundError name a modified, truncated or missing file; a directory from elsewhere (no
    manifest) is loaded as it is, with ``verified=False``.
    """
    directory = Path(directory)
    manifest = verify_export(directory, HF_FORMAT, ("config.json", TENSOR_FILE)) if (
        directory / MANIFEST_FILE).is_file() else None
    try:
        from transformers import LlamaForCausalLM
    except ImportError as err:
        raise ImportError("loading a Hugging Face export needs transformers: pip install 'bitlaw[hf]'") from err
    hf_model = LlamaForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    if manifest is not None:
        config = LlamaConfig.from_dict(manifest.model)
        tokenizer = directory / manifest.tokenizer if manifest.tokenizer else None
    else:
        c = hf_model.config
        config = LlamaConfig(n_layer=c.num_hidden_layers, d_model=c.hidden_size, n_head=c.num_attention_heads,
                             vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                             mlp_hidden=c.intermediate_size)
        tokenizer = directory / TOKENIZER_FILE if (directory / TOKENIZER_FILE).is_file() else None
    return LoadedModel(wrap_transformers_model(hf_model).to(device), config, Recipe(name="bf16"), tokenizer, "hf",
                       directory, manifest is not None, manifest.data if manifest else None)
