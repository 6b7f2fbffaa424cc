"""The LightningModule: next-token loss, AdamW with decay on linear weights, warmup-cosine schedule, metrics.

Throughput and MFU come from the ``Throughput`` callback (``bitlaw.train.callbacks``), which reads
:attr:`LitLlama.flops_per_batch`; non-finite losses are caught by ``NonFiniteLossStop``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn

from ..kernels.gradients import set_noise_context
from ..kernels.recipe import Recipe
from ..models.converter import RecipeConverter
from ..models.llama import LlamaConfig, LlamaModel
from ..models.quant_linear import QuantLinear
from .config import OptimConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total_steps`` (docs/training.md §3).

    Warmup over ``warmup_fraction`` of the steps, cosine-shaped from ``start_ratio·lr`` up to ``lr``; then cosine
    decay to ``end_ratio·lr`` at the last step.
    """
    peak = optim.lr
    warmup = max(1, round(optim.warmup_fraction * total_steps)) if optim.warmup_fraction > 0 else 0
    if step < warmup:
        start = optim.start_ratio * peak
        return start + (peak - start) * (1 - math.cos(math.pi * step / warmup)) / 2
    end = optim.end_ratio * peak
    decay_steps = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return end + (peak - end) * (1 + math.cos(math.pi * progress)) / 2


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: weight decay only on the weights of linear layers inside the blocks, and on the learned
    steps of ``lsq_step`` roles (QuEST's LSQ decays them with the weights, docs/numerics.md §5).

    Norms, embeddings, lm_head, biases and ``lsq`` scales are not decayed (docs/training.md §3).
    """
    decay_ids = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("layers."):
            decay_ids.add(id(m.weight))
            if isinstance(m, QuantLinear):
                decay_ids.update(id(p) for p in m.weight_decayed_scales())
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if id(param) in decay_ids else no_decay).append(param)
    return decay, no_decay


def state_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str | None:
    """How the state dict ``given`` (key → tensor or shape) differs from ``expected`` (key → tensor, meta tensors
    allowed): missing keys, unexpected keys and shape mismatches, each named (the first 8 of each); None when every
    key and shape matches, as a strict ``load_state_dict`` needs."""
    def shape(value: Any) -> tuple[int, ...]:
        return tuple(value.shape if isinstance(value, torch.Tensor) else value)

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{key}: {list(shape(given[key]))} ≠ {list(shape(expected[key]))}"
              for key in sorted(set(expected) & set(given)) if shape(given[key]) != shape(expected[key])]
    problems = [f"{what} {names(keys)}" for what, keys in (("missing keys:", missing),
                                                             ("unexpected keys:", unexpected),
                                                             ("shapes (checkpoint ≠ model):", shapes)) if keys]
    return "; ".join(problems) or None


def noise_index(global_step: int, batch_idx: int, accumulate: int) -> int:
    """The micro-batch's index in the whole run (the noise context of :mod:`bitlaw.kernels.gradients`): optimizer
    steps done × micro-batches per step + this micro-batch's place in its step."""
    return global_step * accumulate + batch_idx % accumulate


class LitLlama(L.LightningModule):
    """Trains a (possibly quantized) :class:`LlamaModel`.

    Batches are ``(x, y)`` int64 ``[micro_batch, seq_len]``. ``run`` holds the batch geometry that a resumed run
    must share: ``seed`` (model init and data order), ``seq_len``, ``global_batch`` (sequences per step, all ranks).
    ``converter`` (a :class:`~bitlaw.models.converter.RecipeConverter` of the recipe, with ``backend``: None follows
    ``$BITLAW_BACKEND``) converts the model and keeps its quantized layers' bookkeeping: its ``pre_step_hook`` runs
    before each training step (a sparse weight's schedule, RigL's gradient capture, docs/numerics.md §7), its
    ``post_optimizer_hook`` after each optimizer step (RigL's mask update); every ``mask_stats_every`` steps it
    samples the masked fractions (``mask/<layer>.<role>``). Which path each kind of quantized layer took is logged as
    ``backend/<kind>`` (1 Triton, 0 reference) and kept, with the reason for a fallback, in :meth:`backend_report`.
    ``settings`` (the run's defining settings, :func:`bitlaw.train.settings.run_settings`) go into every checkpoint,
    to be compared when resuming.
    """

    def __init__(self, model_config: dict[str, Any], recipe: dict[str, Any], optim: dict[str, Any],
                 total_steps: int, run: dict[str, Any], mask_stats_every: int = 50, compile: bool = False,
                 backend: str | None = None, settings: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = LlamaConfig.from_dict(model_config)
        self.recipe = Recipe.from_dict(recipe)
        self.optim = OptimConfig(**optim)
        self.total_steps = total_steps
        self.seq_len = run["seq_len"]
        self.tokens_per_step = run["global_batch"] * run["seq_len"]
        self.mask_stats_every = mask_stats_every
        self.global_batch = run["global_batch"]
        self.seed = run["seed"]
        self.settings = settings  # what defines the run (bitlaw.train.settings), kept in every checkpoint
        # The model is built here, seeded, so every rank and every resumed run starts from the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run["seed"])
            self.model = LlamaModel(self.model_config)
        self.converter = RecipeConverter(self.recipe, backend=backend)
        self.converter.convert(self.model)  # a recipe that compresses nothing (bf16) leaves the model as built
        if compile:
            self.model.compile()  # in place: state_dict keys stay the same with and without compile
        self.tokenizer_path: str | None = None  # set by the CLI; stored in checkpoints for export and generation
        self.init_from: str | None = None  # the checkpoint the weights started from (init_from), set by the CLI
        # The prepared data set ({"directory", "config_hash"}), set by the CLI; stored in checkpoints so exports and
        # bitlaw-eval find the validation split the model was trained beside.
        self.data_source: dict[str, str] | None = None
        self.flops_per_batch: int | None = None  # model FLOPs of one micro-batch, forward + backward (setup)
        self._val_sum = self._val_count = 0.0

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Copy a bitlaw checkpoint's weights (keys ``model.<parameter>``, as :meth:`state_dict` names them) into the
        model, strictly: ValueError naming ``source`` and every missing or unexpected key and wrong shape."""
        mismatch = state_mismatch(self.state_dict(), state_dict)
        if mismatch:
            raise ValueError(f"the weights of {source} do not fit the model ({mismatch})")
        self.load_state_dict(state_dict, strict=True)

    def setup(self, stage: str) -> None:
        # Model FLOPs (the unquantized architecture: rotations and rounding are overhead, not model work) of one
        # micro-batch, counted by Lightning's measure_flops on the meta device: no memory, no compute.
        micro = self.global_batch // (self.trainer.world_size * self.trainer.accumulate_grad_batches)
        with torch.device("meta"):
            model = LlamaModel(self.model_config)
            tokens = torch.zeros(max(micro, 1), self.seq_len, dtype=torch.long)
        self.flops_per_batch = measure_flops(model, lambda: model(tokens, tokens)[1], loss_fn=torch.Tensor.sum)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        step = self.global_step
        # Sampled on steps Lightning writes to the loggers (mask_stats_every is a multiple of log_every_n_steps).
        sample_masks = self.mask_stats_every > 0 and (step + 1) % self.mask_stats_every == 0
        if sample_masks:
            self.converter.track_masks(self.model, True)
        self.converter.pre_step_hook(self.model, step, self.total_steps)
        if self.recipe.quantized_backward:
            # The stochastic backward's bits: per run seed, DDP rank (independent ranks) and micro-batch, so a
            # resumed run draws what the uninterrupted one would have.
            set_noise_context(self.seed, self.global_rank, noise_index(step, batch_idx,
                                                                       self.trainer.accumulate_grad_batches))
        _, loss = self(x, y)
        # The mean over ranks: one scalar all-reduce per step, small beside DDP's gradient all-reduce.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        self.log("tokens_seen", float((step + 1) * self.tokens_per_step))
        sampled: dict[str, float] = {}
        if sample_masks:
            sampled.update(self.converter.masked_fractions(self.model))
            self.converter.track_masks(self.model, False)
        if sample_masks or not self.converter.backend_report():
            sampled.update(self.converter.record_backends(self.model))
        if sample_masks:
            # Straight to the loggers, for this step only: a value given to self.log on some steps is written
            # again on every later step until the next one, which would read as a measurement that was not made.
            for logger in self.loggers:
                logger.log_metrics(sampled, step=step)
        return loss

    def backend_report(self) -> dict[str, dict[str, str | None]]:
        """``{layer kind (e.g. "self_attn.q_proj"): {"backend": "triton" | "reference" | "mixed", "reason": why not
        Triton or None}}`` as seen in training; empty for a model without quantized layers."""
        return self.converter.backend_report()

    def on_validation_epoch_start(self) -> None:
        self._val_sum = self._val_count = 0.0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self(x, y)
        if not self.converter.backend_report():  # evaluating a checkpoint without training first: the same paths
            self.converter.record_backends(self.model)
        self._val_sum += loss.item() * y.numel()
        self._val_count += y.numel()

    def on_validation_epoch_end(self) -> None:
        # Every rank evaluates the same validation batches, so the mean over ranks (one all-reduce per validation)
        # is that same value; reducing keeps the ranks provably in agreement.
        if self._val_count:
            self.log("val/loss", self._val_sum / self._val_count, prog_bar=True, sync_dist=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # After the weights moved (and once per optimizer step, however many micro-batches): RigL's drop/grow and
        # the next step's mask act on the updated weights.
        self.converter.post_optimizer_hook(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = decay_groups(self.model)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_at(step, self.total_steps, self.optim) / self.optim.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bitlaw"] = {"model": self.model_config.to_dict(), "recipe": self.recipe.to_dict(),
                                "tokenizer": self.tokenizer_path, "data": self.data_source,
                                "settings": self.settings, "init_from": self.init_from}
