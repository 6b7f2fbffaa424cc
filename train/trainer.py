"""The Lightning trainer of a run: ``cfg.trainer`` plus the ``logger`` and ``callbacks`` groups, quiet by default."""

from __future__ import annotations

import logging
import warnings

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO


class _DropTips(logging.Filter):
    """Lightning's advertisements ("💡 Tip: … litlogger …") are not about this run, and its "`Trainer.fit`
    stopped: `max_steps=…` reached" repeats what bitlaw-train's last line says (and breaks a progress bar)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("💡 Tip", "`Trainer.fit` stopped: `max_steps="))


def quiet_lightning() -> None:
    """Keep the console to what concerns the run: drop Lightning's tips, and a deprecation warning that Lightning
    2.6's own pytree code raises under torch ≥ 2.10 (not caused by bitlaw's usage; nothing to act on)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in tips.filters):
        tips.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")


def build_trainer(cfg: DictConfig, steps: int) -> L.Trainer:
    """A Lightning trainer from ``cfg.trainer``, with the loggers and callbacks of the ``logger`` and ``callbacks``
    groups instantiated (Hydra ``_target_``; the ``progress`` entry only when ``trainer.enable_progress_bar``)."""
    quiet_lightning()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_steps"] = steps
    loggers = [instantiate(node) for node in cfg.logger.values()]
    callbacks = [instantiate(node) for name, node in cfg.callbacks.items()
                 if name != "progress" or trainer_kwargs["enable_progress_bar"]]
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # The Preemption callback checkpoints at a step boundary and requeues; Lightning's own SLURM requeue (an
        # extra checkpoint and an scontrol call from inside a signal handler) would do it a second time.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(**trainer_kwargs, default_root_dir=cfg.run_dir, logger=loggers, callbacks=callbacks,
                     plugins=plugins, gradient_clip_val=cfg.optim.grad_clip or None,
                     val_check_interval=cfg.val_every * trainer_kwargs["accumulate_grad_batches"],
                     check_val_every_n_epoch=None, num_sanity_val_steps=0, use_distributed_sampler=False,
                     max_epochs=-1)
