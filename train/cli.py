"""``bitlaw-train`` (also ``python -m bitlaw.train``): one pretraining run, as a sequence of steps.

:func:`train` reads top to bottom: the configuration is checked before anything is read or written
(:mod:`~bitlaw.train.plan`); the corpus is tokenized once (or reused); a finished run is skipped; then the model, the
data module and the Lightning trainer (:mod:`~bitlaw.train.trainer`) are built, ``fit`` runs, and the run record is
written (:mod:`~bitlaw.train.record`). A run may start from a checkpoint's weights (:mod:`~bitlaw.train.init_from`).

Bad input (configuration, data files, a checkpoint or record of a run with other settings) raises
:class:`~bitlaw.train.plan.UsageError`: ``bitlaw-train`` prints it as one line and exits with status 2. A non-finite
loss stops every rank (:class:`~bitlaw.train.callbacks.NonFiniteLossError`, one line, status 1). SIGTERM, SIGINT or
SIGUSR1 stop it at the next step boundary with a checkpoint (:class:`~bitlaw.train.callbacks.Interrupted`, one line,
status 128 + the signal's number); running the same command resumes. Anything else is a bug or a fault of the machine
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ..core.config import CONF_DIR
from ..core.records import RunRecord
from ..data.shards import PreparedData
from .callbacks import Interrupted, NonFiniteLossError, Preemption
from .config import register_configs
from .datamodule import TokenDataModule
from .init_from import init_weights
from .module import LitLlama
from .plan import (
    RunDefinition,
    RunPlan,
    UsageError,
    check_continuation,
    define_run,
    plan_run,
    prepare_run_data,
    unwritable,
)
from .record import discard_results, final_record, measured_throughput, write_config, write_record
from .trainer import build_trainer

PROG = "bitlaw-train"


def train(cfg: DictConfig) -> RunRecord:
    """Run one training job described by ``cfg`` (the composed ``conf/train.yaml``); return its run record."""
    plan = plan_run(cfg)
    data = prepare_run_data(plan)
    run = define_run(plan, data)
    start_step = check_continuation(plan, run.settings)
    if isinstance(start_step, RunRecord):
        print(f"{PROG}: skipped {plan.run_dir}: already finished (run.json, val_loss {start_step.val_loss:.4f}); "
              "resume=never trains it again from scratch")
        return start_step
    if cfg.resume == "never":
        discard_results(plan.run_dir)
    module = build_module(plan, run, data)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, plan.run_dir, run.model, plan.recipe if plan.init_from is not None else None)
    datamodule = TokenDataModule(data, cfg.seq_len, cfg.global_batch, cfg.seed, run.steps, cfg.val_batches)
    trainer = build_trainer(cfg, run.steps)
    if trainer.is_global_zero:
        announce(plan, run, start_step)
    wall_tokens_per_s = fit(trainer, module, datamodule, plan, run.steps, start_step)
    # Stopped after its last step but before the record was written: evaluate the checkpoint it saved.
    evaluate = str(plan.resume_from) if start_step >= run.steps else None
    val_loss = float(trainer.validate(module, datamodule=datamodule, ckpt_path=evaluate, verbose=False)[0]["val/loss"])
    record = final_record(cfg, trainer, module, data, run.model, plan.recipe, val_loss, run.steps,
                          measured_throughput(cfg, trainer, module, wall_tokens_per_s), run.settings, plan.init_from)
    if trainer.is_global_zero:
        summarize(record, write_record(plan.run_dir, record), data)
    return record


def build_module(plan: RunPlan, run: RunDefinition, data: PreparedData) -> LitLlama:
    """The seeded LightningModule of the run, with the ``init_from`` checkpoint's weights when the run starts from
    one (not when resuming: the weights then come from the resume checkpoint)."""
    cfg = plan.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LitLlama(run.model.to_dict(), plan.recipe.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True),
                      run.steps, plan.geometry, mask_stats_every=cfg.mask_stats_every, compile=cfg.compile,
                      backend=cfg.backend, settings=run.settings)
    if plan.init_from is not None:
        module.init_from = str(plan.init_from)
        if plan.resume_from is None:
            try:
                module.load_weights(init_weights(plan.init_from), str(plan.init_from))
            except ValueError as err:
                raise UsageError(f"init_from={cfg.init_from!r}: {err}") from None
    module.tokenizer_path = str(data.tokenizer_path)
    module.data_source = {"directory": str(data.directory), "config_hash": data.meta["config_hash"]}
    return module


def announce(plan: RunPlan, run: RunDefinition, start_step: int) -> None:
    """The lines that say what is about to train (global rank 0)."""
    cfg, model = plan.cfg, run.model
    if plan.init_from is not None:
        print(f"{PROG}: init_from {plan.init_from}: model and recipe from the checkpoint (n_layer={model.n_layer}, "
              f"d_model={model.d_model}, recipe {plan.recipe.name}); " + (
                  "fresh optimizer and schedule" if plan.resume_from is None else
                  f"weights, optimizer and schedule from the resume checkpoint {plan.resume_from}"))
    print(f"{PROG}: {model.n_layer} layers × d_model {model.d_model}, N = {model.params_non_embedding:,} "
          f"non-embedding parameters, recipe {plan.recipe.name}; {run.steps} steps of {cfg.global_batch} × "
          f"{cfg.seq_len} tokens" + (f", resuming at step {start_step}" if start_step else "")
          + f"; run directory {plan.run_dir}")


def fit(trainer: L.Trainer, module: LitLlama, datamodule: TokenDataModule, plan: RunPlan, steps: int,
        start_step: int) -> float | None:
    """Train from ``start_step`` to ``steps``; tokens/s over the wall time of ``fit`` (None when nothing was left to
    train). A SIGTERM that Lightning turned into its own exception becomes :class:`Interrupted`."""
    if start_step >= steps:
        return None
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.resume_from) if plan.resume_from else None)
    except SIGTERMException:
        preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
        if preemption is not None and preemption.interruption is not None:
            raise preemption.interruption from None
        raise Interrupted("SIGTERM", trainer.global_step, None, False) from None
    cfg = plan.cfg
    return (steps - start_step) * cfg.global_batch * cfg.seq_len / (time.perf_counter() - started)


def summarize(record: RunRecord, path: Path, data: PreparedData) -> None:
    """The run's last lines: the final loss beside the corpus's unigram entropy, and the kernel path when it was not
    Triton's."""
    print(f"final validation loss {record.val_loss:.4f} nats/token (the first {record.val_batches} × "
          f"{record.global_batch} windows of the validation split); unigram entropy of the corpus "
          f"{data.unigram_entropy_nats:.4f} nats/token; {record.tokens:,} tokens in {record.steps} steps; run record "
          f"{path}")
    for kind, choice in (record.backends or {}).items():
        if choice["backend"] != "triton":
            print(f"{PROG}: {kind} ran the {choice['backend']} path: {choice['reason']}")
            break  # one line: every kind shares the recipe, so the reason is the same


class RunDirectoryCheck(HydraCallback):
    """Hydra callback (``conf/train.yaml``): a run or sweep directory that cannot be written is one line and exit
    status 2, before Hydra creates it (Hydra's own failure would be a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        HydraConfig.instance().set_config(config)  # the directory's interpolations read Hydra's runtime values
        problem = unwritable(Path(str(OmegaConf.select(config, key))))
        if problem:
            print(f"{PROG}: {problem}; choose another with {key}=...", file=sys.stderr)
            raise SystemExit(2)


def main() -> None:
    """``bitlaw-train``: register the config schema, then run the Hydra app."""
    register_configs()
    _hydra_main()


def _discard_attempt() -> None:
    """Remove what Hydra wrote for this attempt before bad input stopped it: its ``.hydra/<time>`` record, an empty
    log, and the run directory and its parents up to the working directory when that leaves them empty. Nothing an
    earlier attempt wrote is touched."""
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.output_subdir:
        shutil.rmtree(out / hydra_cfg.output_subdir, ignore_errors=True)
    log = out / f"{hydra_cfg.job.name}.log"
    if log.is_file() and log.stat().st_size == 0:
        log.unlink()
    folders = [out / ".hydra", out]
    cwd = Path.cwd().resolve()
    if out.resolve().is_relative_to(cwd):
        folders += [p for p in out.parents if p.resolve() != cwd and p.resolve().is_relative_to(cwd)]
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only ever removes an empty directory


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UsageError as err:
        _discard_attempt()
        print(f"{PROG}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        print(f"{PROG}: stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Interrupted as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
