"""Lightning callbacks of a bitlaw training run, instantiated from ``conf/callbacks/*.yaml`` (``_target_``).

- :class:`Checkpoints`: Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` at the final step.
- :class:`Throughput`: Lightning's ``ThroughputMonitor`` (tokens/s, MFU from ``flops_per_batch``) with dense
  tensor-core peaks for Hopper.
- :class:`NonFiniteLossStop`: stops every rank together at the first non-finite training loss, without a host
  synchronisation per step and before any checkpoint could store corrupted weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.throughput import Throughput as _Throughput
from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

# Dense (no structured sparsity) peak FLOP/s of one GPU by compute dtype, from NVIDIA's datasheets. Lightning's own
# table lists H100 NVL and H200 at their 2:4-sparse peaks (2x the dense rate) and misses "NVIDIA H200" names.
# Order matters: the first name fragment contained in the device name wins.
DENSE_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h200 nvl", {"bf16": 835.5e12, "tf32": 417.7e12, "fp32": 60.0e12}),
    ("h200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("h100 nvl", {"bf16": 835.5e12, "tf32": 417.7e12, "fp32": 60.0e12}),
    ("h100 pcie", {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    ("h100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("a100", {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12}),
)


def dense_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one GPU called ``device_name`` (``torch.cuda.get_device_name()``) computing in ``dtype``;
    None when the GPU is not in :data:`DENSE_PEAK_FLOPS`. fp32 counts at the TF32 rate unless
    ``torch.get_float32_matmul_precision()`` is ``"highest"``."""
    name = device_name.lower()
    if dtype in (torch.bfloat16, torch.float16):
        kind = "bf16"
    elif dtype == torch.float32:
        kind = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        return None
    return next((peaks[kind] for fragment, peaks in DENSE_PEAK_FLOPS if fragment in name), None)


class Checkpoints(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two periodic checkpoints.

    Lightning 2.6 writes ``last.ckpt`` in ``on_train_end`` only if no ``last.ckpt`` was written during the run, so a
    run of 157 steps with checkpoints every 100 would end with ``last.ckpt`` at step 100. Takes the
    ``ModelCheckpoint`` arguments; ``every_n_train_steps`` is required.
    """

    def __init__(self, every_n_train_steps: int, **kwargs: Any):
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=True, **kwargs)
        self.every = every_n_train_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if self.dirpath and (Path(self.dirpath) / "last.ckpt").is_file():
                # This run's own directory (bitlaw-train resumes from it, or resume=never retrains on purpose):
                # checkpoints there are expected, not a stray directory Lightning's warning is meant for.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(last, weights_only=False)
        else:
            super().on_train_end(trainer, pl_module)


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` with dense peak FLOP/s (:func:`dense_peak_flops`, or ``peak_flops``).

    Batches are ``(x, y)`` ``[micro_batch, seq_len]``: samples are sequences, items are tokens, so the logged
    ``train/device/items_per_sec`` is tokens/s per device (and ``train/items_per_sec`` over all devices when there
    are several), and ``train/device/mfu`` is model FLOPs (``LitLlama.flops_per_batch``, measured on the meta
    device) over the dense peak. ``summary`` holds the whole training attempt's tokens and seconds (validation
    excluded) after training, for the run record.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 10):
        super().__init__(batch_size_fn=lambda batch: batch[0].shape[0], length_fn=lambda batch: batch[0].numel(),
                         window_size=window_size)
        self.peak_flops = peak_flops
        self.summary: dict[str, float] = {}
        self._trained_batches = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The parent's setup, with our peak in place of Lightning's lookup (which warns for unknown GPUs).
        device = trainer.strategy.root_device
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        self.available_flops = self.peak_flops or (
            dense_peak_flops(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None)
        stages = [trainer.state.stage]
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            stages.append(RunningStage.VALIDATING)
        for running in stages:
            self._throughputs[running] = _Throughput(available_flops=self.available_flops,
                                                     world_size=trainer.world_size, **self.kwargs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self._trained_batches += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self._trained_batches:  # the parent measures on global rank 0 only
            totals = self._throughputs[RunningStage.TRAINING].compute()
            self.summary = {"tokens_per_device": float(totals["lengths"]), "seconds": float(totals["time"]),
                            "peak_flops": self.available_flops}


class NonFiniteLossError(FloatingPointError):
    """Training stopped at ``step`` (0-based optimizer step) because a rank's training loss was not finite."""

    def __init__(self, step: int, last_checkpoint: Path | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(f"non-finite training loss at step {step}; {kept}")


class NonFiniteLossStop(Callback):
    """Stop training, on every rank at the same step, once any rank's training loss was not finite.

    Each step only updates a flag on the device (no host synchronisation). Every ``check_every`` optimizer steps,
    at every step a checkpoint is written (``checkpoint_every``) and at the last step, the ranks agree on the first
    non-finite step (one all-reduce) and all raise :class:`NonFiniteLossError` together: no rank waits for a peer
    that has stopped, and because the check runs before ``ModelCheckpoint`` (Lightning runs checkpoint callbacks
    last), no checkpoint written after a non-finite loss ever exists. ``checkpoint_dir`` is where ``last.ckpt``
    lives, named in the error.
    """

    def __init__(self, check_every: int, checkpoint_every: int, checkpoint_dir: str | None = None):
        if check_every < 1 or checkpoint_every < 1:
            raise ValueError(f"check_every={check_every} and checkpoint_every={checkpoint_every} must be >= 1")
        self.check_every, self.checkpoint_every = check_every, checkpoint_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._first_bad: torch.Tensor | None = None  # int64 on the device: first non-finite step, or -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0  # this micro-batch ended a step
        step = trainer.global_step - 1 if stepped else trainer.global_step
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, step), self._first_bad)
        done = trainer.global_step
        if stepped and (done % self.check_every == 0 or done % self.checkpoint_every == 0
                        or done >= trainer.max_steps):
            self._check()

    def _check(self) -> None:
        # -1 means "none": map it above every step so that MIN over ranks picks the first real one.
        first = torch.where(self._first_bad < 0, torch.full_like(self._first_bad, 2**62), self._first_bad)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)  # the one host synchronisation, every check_every steps
        if step < 2**62:
            last = self.checkpoint_dir / "last.ckpt" if self.checkpoint_dir else None
            raise NonFiniteLossError(step, last if last is not None and last.is_file() else None)
