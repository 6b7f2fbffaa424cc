"""One loader for everything bitlaw can serve: training checkpoints, native exports and Hugging Face exports.

:func:`load_model` looks at what it is given and returns a :class:`LoadedModel` whose ``model`` has the
:class:`~bitlaw.models.llama.LlamaModel` call contract, whatever it was loaded from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitlaw.kernels.recipe import Recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel


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


def load_model(source: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a training checkpoint (``*.ckpt``), a native export or a Hugging Face export directory."""
    from bitlaw.deploy import hf, native  # here: each pulls in its own format's dependencies

    source = Path(source)
    if source.is_file():
        return load_checkpoint(source, device)
    if (source / native.META_FILE).is_file():
        return native.load_native(source, device)
    if (source / "config.json").is_file():
        return hf.load_hf(source, device)
    raise FileNotFoundError(f"{source}: not a checkpoint file, a native export ({native.META_FILE}) or a Hugging "
                            "Face export (config.json)")
