"""Lightning callbacks of a bitlaw training run, instantiated from ``conf/callbacks/*.yaml`` (``_target_``).

- :class:`Checkpoints`: Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` at the final step.
- :class:`Throughput`: Lightning's ``ThroughputMonitor`` (tokens/s, MFU from ``flops_per_batch``) with dense
  tensor-core peaks for Hopper.
- :class:`NonFiniteLossStop`: stops every rank together at the first non-finite training loss, without a host
  synchronisation per step and before any checkpoint could store corrupted weights.
- :class:`Preemption`: SIGTERM, SIGINT, SIGUSR1 → a checkpoint at the next step boundary and a non-zero exit
  (requeued under SLURM).
- :class:`StepProgress`: progress in optimizer steps, a bar on a terminal and plain lines in a log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.throughput import Throughput as _Throughput
from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm import tqdm

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

    @property
    def state_key(self) -> str:
        # One key whatever the cadence: checkpoint cadence may change between attempts of a run (it does not change
        # the result), and Lightning warns about "callbacks used to create the checkpoint" when the key differs.
        return type(self).__name__

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


class Interrupted(Exception):
    """Training stopped by ``signal_name`` after ``step`` optimizer steps, with ``checkpoint`` written there."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, requeued: bool):
        self.signal_name, self.step, self.checkpoint, self.requeued = signal_name, step, checkpoint, requeued
        self.exit_code = 128 + signal.Signals[signal_name].value  # the shell's convention for "killed by"
        then = "the job was requeued and resumes there" if requeued else "run the same command to resume"
        kept = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written (no Preemption callback)"
        super().__init__(f"stopped by {signal_name} after step {step}; {kept}; {then}")


class Preemption(Callback):
    """SIGTERM, SIGINT and SIGUSR1 stop training at the next step boundary with a checkpoint, every rank together.

    Lightning turns SIGTERM into a stop after the current batch, agreed on by all ranks (it broadcasts the flag at
    each batch). This callback routes SIGINT (Ctrl-C) and SIGUSR1 (what SLURM sends before a time limit or a
    preemption, with ``--signal=USR1@<seconds>``) into that same path, writes ``last.ckpt`` when the stop happens
    (the step boundary: batches of an unfinished step are replayed on resume), and, under SLURM with ``requeue``,
    asks SLURM to requeue the job (``scontrol requeue``), which then resumes from that checkpoint. ``bitlaw-train``
    then exits non-zero (128 + the signal's number), so ``bitlaw-train && bitlaw-export`` never exports a
    half-trained model.
    """

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self, checkpoint_dir: str, requeue: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requeue = requeue
        self.received: int | None = None
        self.interruption: Interrupted | None = None  # set when a signal stopped training
        self._previous: dict[int, Any] = {}
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        # Lightning registers its SIGTERM handler after setup and keeps ours in it; it restores the handlers it
        # found (these) after fit, so once inactive they hand every signal to what was there before.
        self._active = True
        for name in self.SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        if not self._active:
            self._delegate(number, frame)
            return
        self.received = self.received or number
        if number != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # into Lightning's path: stop after this batch, ranks agreeing

    def _delegate(self, number: int, frame) -> None:
        previous = self._previous.get(number, signal.SIG_DFL)
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        last = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)  # every rank stops at the same batch: collective is safe
        requeued = False
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero and self.received == signal.SIGUSR1:
            requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True).returncode == 0
        name = signal.Signals(self.received or signal.SIGTERM).name
        # Raised by bitlaw-train once Lightning has torn the run down (raising here would skip its teardown).
        self.interruption = Interrupted(name, trainer.global_step, last, requeued)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False
        for number, previous in self._previous.items():
            signal.signal(number, previous)


class StepProgress(ProgressBar):
    """Progress in optimizer steps: a tqdm bar on a terminal, a plain line every ``print_every`` steps otherwise
    (a log file gets readable lines instead of carriage returns). Shows the step, the training loss, the last
    validation loss and tokens/s."""

    def __init__(self, print_every: int = 50):
        super().__init__()
        self.print_every = print_every
        self._enabled = True
        self._bar = None
        self._interactive = sys.stdout.isatty()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer: L.Trainer) -> str:
        metrics = trainer.progress_bar_metrics
        parts = [f"{key} {metrics[key]:.4f}" for key in ("train/loss", "val/loss") if key in metrics]
        speed = trainer.logged_metrics.get("train/device/items_per_sec")  # where ThroughputMonitor writes it
        if speed is not None:
            parts.append(f"{float(speed) * trainer.world_size:,.0f} tokens/s")
        return " | ".join(parts)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._interactive and trainer.is_global_zero:
            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", desc="training",
                             dynamic_ncols=True, file=sys.stdout)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        if self._bar is not None:
            self._bar.n = trainer.global_step
            self._bar.set_postfix_str(self._line(trainer), refresh=False)
            self._bar.refresh()
        elif trainer.global_step % self.print_every == 0 and trainer.global_step:
            print(f"step {trainer.global_step}/{trainer.max_steps} | {self._line(trainer)}", flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
