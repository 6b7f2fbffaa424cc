"""``bitlaw-train`` (also ``python -m bitlaw.train``): one pretraining run, as a sequence of steps.

:func:`train` reads top to bottom: :func:`plan_run` checks the whole configuration before anything is read or
written; :func:`prepare_run_data` tokenizes the corpus once (or reuses it); a finished run is skipped; then the
model, the data module and the Lightning trainer are built (:func:`build_trainer` instantiates the ``logger`` and
``callbacks`` groups), ``fit`` runs, and :func:`final_record` writes ``run.json``.

Bad input (configuration, data files, a checkpoint of another run) raises :class:`UsageError`: ``bitlaw-train``
prints it as one line and exits with status 2. A non-finite loss stops every rank
(:class:`~bitlaw.train.callbacks.NonFiniteLossError`, one line, status 1). Anything else is a bug or a fault of the
machine and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from bitlaw.data.config import DataConfig
from bitlaw.data.shards import PreparedData, prepare_data
from bitlaw.kernels.linear import BACKENDS
from bitlaw.kernels.recipe import CONF_DIR, Recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel
from bitlaw.train.callbacks import NonFiniteLossError, Throughput
from bitlaw.train.checkpoint import AtomicCheckpointIO, atomic_write_bytes, check_resumable
from bitlaw.train.config import max_steps, register_configs
from bitlaw.train.datamodule import TokenDataModule
from bitlaw.train.module import LitLlama
from bitlaw.train.record import code_version, finished_record, write_record

PROG = "bitlaw-train"


class UsageError(ValueError):
    """Bad input from the command line, the configuration or the files it names (exit status 2)."""


@dataclass
class RunPlan:
    """A checked configuration: everything :func:`train` needs before it reads data or writes anything."""

    cfg: DictConfig
    run_dir: Path
    model: dict[str, Any]  # LlamaConfig fields; vocab_size is replaced by the tokenizer's
    recipe: Recipe
    data: DataConfig
    resume_from: Path | None  # the checkpoint to continue from

    @property
    def geometry(self) -> dict[str, Any]:
        """The batch settings a resumed run must share with its checkpoint."""
        return {"seed": self.cfg.seed, "seq_len": self.cfg.seq_len, "global_batch": self.cfg.global_batch}


def plan_run(cfg: DictConfig) -> RunPlan:
    """Check every setting that needs no data or compute; raise :class:`UsageError` naming the first bad one."""
    try:
        model = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg = LlamaConfig.from_dict(model)
        recipe = Recipe.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
        with torch.device("meta"):
            meta_model = LlamaModel(model_cfg)
        if recipe.quantized:
            convert(meta_model, recipe)  # raises, naming the layer, if a Hadamard block does not fit the width
        if not 1 <= cfg.seq_len <= model_cfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} must be in [1, model.max_seq_len={model_cfg.max_seq_len}]")
        for key in ("global_batch", "val_every", "val_batches", "ckpt_every"):
            if cfg[key] < 1:
                raise ValueError(f"{key}={cfg[key]} must be >= 1")
        if cfg.mask_stats_every < 0 or cfg.mask_stats_every % cfg.trainer.log_every_n_steps:
            raise ValueError(f"mask_stats_every={cfg.mask_stats_every} must be 0 (never) or a multiple of "
                             f"trainer.log_every_n_steps={cfg.trainer.log_every_n_steps} (steps the loggers write)")
        if cfg.backend is not None and cfg.backend not in BACKENDS:
            raise ValueError(f"backend={cfg.backend!r} is not allowed; allowed: {', '.join(BACKENDS)} (or null: "
                             "$BITLAW_BACKEND, else auto)")
        max_steps(cfg, model_cfg.params_non_embedding)
        data = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
        data.cache_dir = to_absolute_path(data.cache_dir)
        data.paths = [to_absolute_path(p) for p in data.paths]
        data.validate()
        run_dir = Path(cfg.run_dir)
        return RunPlan(cfg, run_dir, model, recipe, data, _resume_path(cfg, run_dir))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def _resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    path = Path(to_absolute_path(cfg.resume))
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint (allowed: auto, never, or a path)")
    return path


def prepare_run_data(plan: RunPlan) -> PreparedData:
    """The tokenized data set (prepared now, or reused); bad data files raise :class:`UsageError`."""
    try:
        return prepare_data(plan.data, progress=plan.cfg.trainer.enable_progress_bar)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


class _DropTips(logging.Filter):
    """Lightning's advertisements ("💡 Tip: … litlogger …") are not about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


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
    groups instantiated (Hydra ``_target_``)."""
    quiet_lightning()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_steps"] = steps
    loggers = [instantiate(node) for node in cfg.logger.values()]
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    return L.Trainer(**trainer_kwargs, default_root_dir=cfg.run_dir, logger=loggers, callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()], gradient_clip_val=cfg.optim.grad_clip or None,
                     val_check_interval=cfg.val_every * trainer_kwargs["accumulate_grad_batches"],
                     check_val_every_n_epoch=None, num_sanity_val_steps=0, use_distributed_sampler=False,
                     max_epochs=-1)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` (the composed ``conf/train.yaml``); return its run record."""
    plan = plan_run(cfg)
    data = prepare_run_data(plan)
    model_cfg = LlamaConfig.from_dict({**plan.model, "vocab_size": data.vocab_size})
    steps = max_steps(cfg, model_cfg.params_non_embedding)
    settings = {"model": model_cfg.to_dict(), "recipe": plan.recipe.to_dict(), "steps": steps, **plan.geometry}
    try:
        start_step = 0
        if plan.resume_from is not None:
            start_step = check_resumable(plan.resume_from, model_cfg.to_dict(), plan.recipe.to_dict(), plan.geometry)
        if cfg.resume != "never":
            finished = finished_record(plan.run_dir, settings)
            if finished is not None:
                print(f"{PROG}: skipped {plan.run_dir}: already finished (run.json, val_loss "
                      f"{finished['val_loss']:.4f}); resume=never trains it again from scratch")
                return finished
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.resume == "never":
        # Retraining from scratch: the old record and metrics must not be mistaken for this run's.
        for name in ("run.json", "metrics.csv"):
            (plan.run_dir / name).unlink(missing_ok=True)

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_bytes(plan.run_dir / "config.yaml", lambda fh: fh.write(resolved.encode()))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LitLlama(model_cfg.to_dict(), plan.recipe.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True),
                      steps, plan.geometry, mask_stats_every=cfg.mask_stats_every, compile=cfg.compile,
                      backend=cfg.backend)
    module.tokenizer_path = str(data.tokenizer_path)
    datamodule = TokenDataModule(data, cfg.seq_len, cfg.global_batch, cfg.seed, steps, cfg.val_batches)
    trainer = build_trainer(cfg, steps)
    if trainer.is_global_zero:
        print(f"{PROG}: {model_cfg.n_layer} layers × d_model {model_cfg.d_model}, N = "
              f"{model_cfg.params_non_embedding:,} non-embedding parameters, recipe {plan.recipe.name}; {steps} steps "
              f"of {cfg.global_batch} × {cfg.seq_len} tokens" + (f", resuming at step {start_step}" if start_step
                                                                else "") + f"; run directory {plan.run_dir}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.resume_from) if plan.resume_from else None)
    fit_seconds = time.perf_counter() - started
    val_loss = float(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"])
    record = final_record(cfg, trainer, module, data, model_cfg, plan.recipe, val_loss,
                          (trainer.global_step - start_step) * cfg.global_batch * cfg.seq_len / fit_seconds)
    if trainer.is_global_zero:
        path = write_record(plan.run_dir, record)
        print(f"final validation loss {val_loss:.4f} nats/token; unigram entropy of the corpus "
              f"{data.unigram_entropy_nats:.4f} nats/token; {record['tokens']:,} tokens in {trainer.global_step} "
              f"steps; run record {path}")
        for kind, choice in record["backends"].items():
            if choice["backend"] != "triton":
                print(f"{PROG}: {kind} ran the {choice['backend']} path: {choice['reason']}")
                break  # one line: every kind shares the recipe, so the reason is the same
    return record


def final_record(cfg: DictConfig, trainer: L.Trainer, module: LitLlama, data: PreparedData, model_cfg: LlamaConfig,
                 recipe: Recipe, val_loss: float, wall_tokens_per_s: float) -> dict[str, Any]:
    """The run record (``run.json``) of a finished run; tokens/s from the ``Throughput`` callback (training steps
    only) when it ran, else from the wall time of ``fit`` (validation and checkpoints included), as ``throughput``
    says."""
    tokens_per_step = cfg.global_batch * cfg.seq_len
    monitor = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    throughput: dict[str, Any] = {"source": "wall clock of fit", "tokens_per_s": wall_tokens_per_s, "mfu": None,
                                  "peak_flops": None}
    if monitor is not None and monitor.summary:
        summary = monitor.summary
        per_device = summary["tokens_per_device"] / summary["seconds"]
        flops_per_token = module.flops_per_batch / (tokens_per_step / trainer.world_size
                                                    / trainer.accumulate_grad_batches)
        throughput = {"source": "Throughput callback (training steps, validation excluded)",
                      "tokens_per_s": per_device * trainer.world_size,
                      "mfu": flops_per_token * per_device / summary["peak_flops"] if summary["peak_flops"] else None,
                      "peak_flops": summary["peak_flops"]}
    return {
        "params_non_embedding": model_cfg.params_non_embedding,
        "params_total": model_cfg.params_total,
        "tokens": trainer.global_step * tokens_per_step,
        "steps": trainer.global_step,
        "val_loss": val_loss,
        "recipe": recipe.to_dict(),
        "model": model_cfg.to_dict(),
        "model_preset": HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None,
        "seq_len": cfg.seq_len,
        "global_batch": cfg.global_batch,
        "val_batches": cfg.val_batches,
        "lr": cfg.optim.lr,
        "seed": cfg.seed,
        "tokens_per_s": throughput["tokens_per_s"],
        "throughput": throughput,
        "backends": module.backend_report(),
        "unigram_entropy_nats": data.unigram_entropy_nats,
        "data": {"directory": str(data.directory), "config_hash": data.meta["config_hash"]},
        "device": torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else "cpu",
        "world_size": trainer.world_size,
        "code_version": code_version(),
    }


def main() -> None:
    """``bitlaw-train``: register the config schema, then run the Hydra app."""
    register_configs()
    _hydra_main()


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UsageError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        print(f"{PROG}: stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
