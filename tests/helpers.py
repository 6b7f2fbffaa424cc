"""Helpers shared by the test packages: small corpora, a one-layer training config, a shared tiny run."""

from __future__ import annotations

import csv
import functools
import json
import random
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from bitlaw.core.config import CONF_DIR
from bitlaw.train.cli import train
from bitlaw.train.config import register_configs

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers, stones and "
         "the long quiet roads that lead to old towns").split()


def markov_corpus(path: Path, docs: int = 400, words: int = 150, seed: int = 0) -> Path:
    """Write ``docs`` .jsonl rows of a simple Markov-ish word chain: learnable, so the loss falls within a few
    steps."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(docs):
            chain = [rng.choice(WORDS)]
            for _ in range(words):
                i = WORDS.index(chain[-1])
                chain.append(WORDS[(i + rng.choice((1, 1, 1, 2))) % len(WORDS)])
            fh.write(json.dumps({"text": " ".join(chain) + "."}) + "\n")
    return path


def word_corpus(path: Path, docs: int, words: int, seed: int = 0) -> Path:
    """Write ``docs`` .jsonl rows of ``words`` uniformly random words from :data:`WORDS` to ``path``."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words)) + "."}) + "\n")
    return path


def small_overrides(corpus: Path, cache: Path, run_dir: Path, quant: str = "bf16") -> list[str]:
    """Overrides for a one-layer model on the test corpus that trains in seconds."""
    return [f"quant={quant}", "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={cache}",
            "data.bpe_vocab_size=300", "data.val_fraction=0.1", "model.n_layer=1", "model.d_model=128",
            "model.n_head=1", "seq_len=32", "global_batch=8", "tokens=null", "trainer.max_steps=12",
            "val_every=6", "val_batches=2", "ckpt_every=4", "mask_stats_every=3", "optim.lr=3e-3",
            "trainer.enable_progress_bar=false", f"run_dir={run_dir}", "trainer.log_every_n_steps=1"]


def train_losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` from a run directory's metrics.csv."""
    with open(run_dir / "metrics.csv") as fh:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(fh) if row["train/loss"]}


def train_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``bitlaw-train *args`` in a fresh process (``python -m bitlaw.train``), output captured as text."""
    return subprocess.run([sys.executable, "-m", "bitlaw.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def compose_train(overrides: list[str]):
    """The composed ``conf/train.yaml`` with ``overrides``, as ``bitlaw-train`` would see it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="train", overrides=overrides)


TINY_RUN_RECIPE = "quest_w4a4"  # quantized, so checkpoint loading, the cache and evaluation run through QuantLinear
_REPLACED = ("trainer.max_steps=", "val_every=", "ckpt_every=")


@functools.cache
def tiny_run(corpus: Path, base: Path) -> Path:
    """Train the one-layer model of :func:`small_overrides` for 6 steps into ``base/tiny-run`` once per session;
    returns the run directory (``checkpoints/last.ckpt``, ``run.json`` with the final ``val_loss`` over 2
    validation batches)."""
    run_dir = base / "tiny-run"
    overrides = [o for o in small_overrides(corpus, base / "cache", run_dir, TINY_RUN_RECIPE)
                 if not o.startswith(_REPLACED)]
    train(compose_train(overrides + ["trainer.max_steps=6", "val_every=6", "ckpt_every=6"]))
    return run_dir
