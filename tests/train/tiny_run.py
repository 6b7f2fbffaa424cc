"""A tiny trained run shared by the generation and evaluation tests: trained once per test session."""

from __future__ import annotations

import functools
from pathlib import Path

from train.cli import train

from .conftest import compose_train, small_overrides

RECIPE = "quest_w4a4"  # quantized, so checkpoint loading, the cache and evaluation run through QuantLinear
_REPLACED = ("trainer.max_steps=", "val_every=", "ckpt_every=")


@functools.cache
def tiny_run(corpus: Path, base: Path) -> Path:
    """Train the conftest's one-layer model for 6 steps into ``base/tiny-run``; returns the run directory
    (``checkpoints/last.ckpt``, ``run.json`` with the final ``val_loss`` over 2 validation batches)."""
    run_dir = base / "tiny-run"
    overrides = [o for o in small_overrides(corpus, base / "cache", run_dir, RECIPE) if not o.startswith(_REPLACED)]
    train(compose_train(overrides + ["trainer.max_steps=6", "val_every=6", "ckpt_every=6"]))
    return run_dir
