"""Shared fixtures for training tests: a small local corpus and a composed training config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kernels.recipe import CONF_DIR
from train.config import register_schema

register_schema()

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers, stones and "
         "the long quiet roads that lead to old towns").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A deterministic text corpus of ~60k words in 400 .jsonl rows (documents)."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as fh:
        for _ in range(400):
            # A simple Markov-ish text: learnable structure so the loss falls within a few steps.
            words = [rng.choice(WORDS)]
            for _ in range(150):
                i = WORDS.index(words[-1])
                words.append(WORDS[(i + rng.choice((1, 1, 1, 2))) % len(WORDS)])
            fh.write(json.dumps({"text": " ".join(words) + "."}) + "\n")
    return path


def small_overrides(corpus: Path, cache: Path, run_dir: Path, quant: str = "bf16") -> list[str]:
    """Overrides for a one-layer model on the test corpus that trains in seconds."""
    return [f"quant={quant}", "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={cache}",
            "data.bpe_vocab_size=300", "data.val_fraction=0.1", "model.n_layer=1", "model.d_model=128",
            "model.n_head=1", "seq_len=32", "global_batch=8", "tokens=null", "trainer.max_steps=12",
            "val_every=6", "val_batches=2", "ckpt_every=4", "mask_stats_every=3", "optim.lr=3e-3",
            "trainer.enable_progress_bar=false", f"run_dir={run_dir}", "trainer.log_every_n_steps=1"]


def word_corpus(path: Path, docs: int, words: int, seed: int = 0) -> Path:
    """Write ``docs`` .jsonl rows of ``words`` uniformly random words from :data:`WORDS` to ``path``."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words)) + "."}) + "\n")
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` from a run directory's metrics.csv."""
    import csv

    with open(run_dir / "metrics.csv") as fh:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(fh) if row["train/loss"]}


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="train", overrides=overrides)
