"""Typed structured configs behind ``conf/train.yaml``: every field documented once, typos fail at start.

The schema reuses the project's own dataclasses where they exist (``LlamaConfig`` for ``model``, ``Recipe`` for
``quant``, ``DataConfig`` for ``data``), so no field list is written twice. ``trainer`` keys are passed to
``lightning.Trainer`` as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from bitlaw.data.config import DataConfig
from bitlaw.kernels.recipe import Recipe
from bitlaw.models.llama import LlamaConfig


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
    deterministic: bool = False


@dataclass
class LoggerConfig:
    """Where metrics go besides ``metrics.csv`` in the run directory (always written)."""

    kind: str = "csv"  # "csv" or "wandb"
    project: str = "bitlaw"  # wandb project
    entity: str | None = None  # wandb entity (team); None: the default one
    offline: bool | None = None  # wandb: None → offline unless an API key is configured


@dataclass
class RunConfig:
    """One training run. ``conf/train.yaml`` composes the groups into this schema."""

    model: LlamaConfig = field(default_factory=lambda: LlamaConfig(n_layer=4, d_model=256, n_head=2))
    quant: Recipe = field(default_factory=Recipe)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # model init and data order
    seq_len: int = 256  # tokens per training sequence (≤ model.max_seq_len)
    global_batch: int = 16  # sequences per optimizer step, summed over all devices and micro-batches
    tokens: int | None = None  # token budget D; exclusive with tokens_per_param
    tokens_per_param: float | None = None  # D = tokens_per_param · N (non-embedding)
    val_every: int = 100  # validate every this many optimizer steps (and at the end)
    val_batches: int = 8  # validation batches of global_batch sequences, always the same ones
    ckpt_every: int = 200  # periodic checkpoint every this many steps (plus last.ckpt)
    mask_stats_every: int = 50  # log each quantized layer's masked fraction every this many steps; 0: never
    compile: bool = False  # torch.compile the model
    backend: str | None = None  # quantized-linear path: auto, reference, triton; None: $BITLAW_BACKEND (else auto)
    resume: str = "auto"  # "auto": continue from <run_dir>/checkpoints/last.ckpt if present; "never"; or a path
    run_dir: str = "runs/default"  # set by conf/train.yaml from hydra's run directory
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: looked up for known GPUs


def _writable(cfg: DictConfig) -> DictConfig:
    # Frozen dataclasses (Recipe, TensorSpec) become read-only nodes; Hydra must be able to merge presets in.
    OmegaConf.set_readonly(cfg, False)
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            _writable(node)
    return cfg


def register_schema() -> None:
    """Store the schema as ``train_schema`` in Hydra's ConfigStore (``conf/train.yaml`` lists it first)."""
    ConfigStore.instance().store(name="train_schema", node=_writable(OmegaConf.structured(RunConfig)))


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
