"""Small checkpoints in bitlaw-train's layout (and run directories around them) for the export tests: seconds to
build, no training."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from bitlaw.core.records import RunRecord
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.llama import LlamaConfig
from bitlaw.train.module import LitLlama

MODEL = {"n_layer": 2, "d_model": 128, "n_head": 1, "vocab_size": 96, "max_seq_len": 64}
WORDS = ("<|endoftext|> the quick brown fox jumps over a lazy dog").split()


def small_tokenizer(path: Path) -> Path:
    """A word-level tokenizer of 10 ids (EOS among them), small enough for :data:`MODEL`'s vocabulary."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def small_checkpoint(directory: Path, recipe_name: str, seed: int = 0, tokenizer: Path | None = None,
                     name: str | None = None) -> Path:
    """A checkpoint in bitlaw-train's layout at ``directory/<name or recipe>.ckpt``, with trained-looking (random,
    LSQ-initialised) weights, recording ``tokenizer`` (which need not exist) as its tokenizer."""
    recipe = load_recipe(recipe_name)
    module = LitLlama(MODEL, recipe.to_dict(), {}, 10, {"seed": seed, "seq_len": 32, "global_batch": 2})
    module.model(torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(seed)))  # LSQ init
    module.tokenizer_path = str(tokenizer) if tokenizer is not None else None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name or recipe_name}.ckpt"
    ckpt = {"state_dict": module.state_dict(), "global_step": 1, "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def small_run(directory: Path, recipe_name: str = "bf16") -> Path:
    """A run directory as bitlaw-train leaves it (``checkpoints/last.ckpt``, ``run.json``) around a small
    checkpoint with a tokenizer; returns the run directory."""
    tokenizer = small_tokenizer(directory.parent / f"{directory.name}-tokenizer.json")
    small_checkpoint(directory / "checkpoints", recipe_name, tokenizer=tokenizer, name="last")
    config = LlamaConfig.from_dict(MODEL)
    record = RunRecord(params_non_embedding=config.params_non_embedding, tokens=2 * 32, steps=1, val_loss=4.5,
                       recipe=load_recipe(recipe_name).to_dict(), model=config.to_dict(), seq_len=32, global_batch=2,
                       val_batches=1)
    (directory / "run.json").write_text(record.to_json())
    return directory


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(seed))
