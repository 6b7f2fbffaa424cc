"""Typed structured configs behind ``conf/train.yaml``: every field documented once, typos fail at start.

The schema reuses the project's own dataclasses where they exist (``LlamaConfig`` for ``model``, ``DataConfig`` for
``data``), so no field list is written twice. ``quant`` is a mapping here and becomes a
:class:`~bitlaw.kernels.recipe.Recipe` (frozen, so OmegaConf could only hold it read-only) when the run is
planned, which rejects unknown fields with the allowed ones named. ``trainer`` keys are passed to
``lightning.Trainer`` as they are; ``logger`` and ``callbacks`` are mappings of name → ``_target_`` config that
Hydra instantiates (``conf/logger/``, ``conf/callbacks/``), so a user adds one with
``+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..data.config import DataConfig
from ..models.llama import LlamaConfig


@dataclass
class OptimConfig:
    """AdamW and the warmup-cosine schedule of docs/training.md §3 (per optimizer step)."""

    lr: float = 1.2e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on the block linear weights only (not norms, embeddings, lm_head, LSQ scales)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables it
    warmup_fraction: float = 0.1  # share of the steps spent warming up
    start_ratio: float = 0.01  # lr at step 0 = start_ratio · lr
    end_ratio: float = 0.1  # lr at the last step = end_ratio · lr


@dataclass
class TrainerConfig:
    """Keyword arguments of ``lightning.Trainer`` (any of these can be overridden: ``trainer.devices=8``)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # "bf16-mixed" on GPU: bf16 autocast, fp32 master weights
    max_steps: int = -1  # -1: derived from the token budget (tokens or tokens_per_param)
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_model_summary: bool = False  # bitlaw-train prints its own one-line summary of the model and the run
    deterministic: bool = False


@dataclass
class RunConfig:
    """One training run. ``conf/train.yaml`` composes the groups into this schema."""

    model: LlamaConfig = field(default_factory=lambda: LlamaConfig(n_layer=4, d_model=256, n_head=2))
    quant: dict[str, Any] = field(default_factory=lambda: {"name": "bf16"})  # a conf/quant preset (Recipe fields)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # name → Lightning logger config with _target_
    callbacks: dict[str, Any] = field(default_factory=dict)  # name → Lightning callback config with _target_
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # model init and data order
    seq_len: int = 256  # tokens per training sequence (≤ model.max_seq_len)
    global_batch: int = 16  # sequences per optimizer step, summed over all devices and micro-batches
    tokens: int | None = None  # token budget D; exclusive with tokens_per_param
    tokens_per_param: float | None = None  # D = tokens_per_param · N (non-embedding)
    val_every: int = 100  # validate every this many optimizer steps (and at the end)
    val_batches: int = 8  # validation batches of global_batch sequences, always the same ones
    ckpt_every: int = 200  # periodic checkpoint every this many steps (plus last.ckpt)
    mask_stats_every: int = 50  # log masked fractions and backends every this many steps (a multiple of
    #                             trainer.log_every_n_steps); 0: never
    compile: bool = False  # torch.compile the model
    backend: str | None = None  # quantized-linear path: auto, reference, triton; None: $BITLAW_BACKEND (else auto)
    resume: str = "auto"  # "auto": continue from <run_dir>/checkpoints/last.ckpt if present; "never"; or a path
    init_from: str | None = None  # start from a bitlaw checkpoint's weights instead of random init (fine-tuning,
    #   healing after compression): a checkpoint file ({"bitlaw": {"model", "recipe", ...}, "state_dict"}: a
    #   bitlaw-train *.ckpt, or the one bitlaw-compress writes to heal) or a run directory (its
    #   checkpoints/last.ckpt). Its model and recipe replace the model and quant groups; optimizer, schedule and
    #   step count start fresh at step 0 and the budget is tokens/tokens_per_param. A run directory that already
    #   has checkpoints/last.ckpt resumes from it (resume=auto): the weights then come from that checkpoint, and
    #   init_from must still name a valid checkpoint (it gives the architecture). None: random init from seed.
    run_dir: str = "runs/default"  # set by conf/train.yaml from hydra's run directory
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: looked up for known GPUs


def register_configs() -> None:
    """Store the schema as ``train_schema`` in Hydra's ConfigStore (``conf/train.yaml`` lists it first).

    Call before composing ``conf/train.yaml`` (``bitlaw-train``'s ``main`` does; so do the benchmarks and
    the tests). Storing it again replaces it with the same schema.
    """
    ConfigStore.instance().store(name="train_schema", node=RunConfig)
    OmegaConf.register_new_resolver("bitlaw_suffix", run_dir_suffix, replace=True)
    OmegaConf.register_new_resolver("bitlaw_name", run_dir_name, replace=True)


def run_dir_name(model_choice: str, recipe_name: str, init_from: str | None = None) -> str:
    """What ``conf/train.yaml``'s default run directory starts with: ``<model>-<recipe>`` (the groups' choices), or,
    with ``init_from`` (whose checkpoint replaces both groups), ``from-<name>-<hash>``: ``<name>`` the checkpoint's
    run directory (``<run>/checkpoints/last.ckpt`` and ``<run>``: ``<run>``'s name; ``<run>/checkpoints/step8.ckpt``:
    ``<run>-step8``) or file stem, characters other than letters, digits and ``._=+-`` as ``_`` (one directory
    level, whatever the path), at most 60; ``<hash>`` 6 hex digits of the absolute path, so two checkpoints of the
    same name do not share a directory."""
    if init_from is None or str(init_from) == "":
        return f"{model_choice}-{recipe_name}"
    path = Path(os.path.abspath(str(init_from)))
    if path.parent.name == "checkpoints" and path.suffix:
        name = path.parent.parent.name + ("" if path.stem == "last" else f"-{path.stem}")
    else:
        name = path.stem if path.suffix == ".ckpt" else path.name
    name = re.sub(r"[^A-Za-z0-9._=+-]", "_", name)[:60] or "checkpoint"
    return f"from-{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def run_dir_suffix(overrides: str, limit: int = 120) -> str:
    """What ``conf/train.yaml``'s default run directory appends for Hydra's ``override_dirname`` (the
    result-defining overrides, ``key=value`` joined by commas): nothing when there are none, else ``--`` and the
    overrides with ``/`` as ``_`` (one directory level, whatever the values); beyond ``limit`` characters, the first
    ones and a hash of the whole (file names are at most 255 bytes)."""
    if not overrides:
        return ""
    text = overrides.replace("/", "_")
    if len(text) > limit:
        text = f"{text[:limit - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return f"--{text}"


def max_steps(cfg: RunConfig | DictConfig, params_non_embedding: int) -> int:
    """Optimizer steps of the run: ``trainer.max_steps`` if > 0, else the token budget / tokens per step.

    Raises ValueError when both or neither of ``tokens`` / ``tokens_per_param`` are set (and max_steps is -1).
    """
    if cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    if (cfg.tokens is None) == (cfg.tokens_per_param is None):
        raise ValueError(f"set exactly one token budget: tokens={cfg.tokens} or tokens_per_param="
                         f"{cfg.tokens_per_param} (or trainer.max_steps > 0)")
    budget = cfg.tokens if cfg.tokens is not None else cfg.tokens_per_param * params_non_embedding
    if budget <= 0:
        raise ValueError(f"the token budget must be positive, got {budget}")
    return max(1, math.ceil(budget / (cfg.global_batch * cfg.seq_len)))
