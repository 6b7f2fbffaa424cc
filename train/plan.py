"""What a run will be, checked before anything is read or written: the configuration, the machine, the run
directory, and whether the run starts, resumes or is already finished.

:func:`plan_run` checks every setting that needs no data or compute; :func:`define_run` fixes what the data set
decides (the tokenizer's vocabulary, the number of steps) and the settings that define the run's result;
:func:`check_continuation` compares those settings with a checkpoint to resume or a finished record. Bad input raises
:class:`UsageError`, which ``bitlaw-train`` prints as one line with exit status 2.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ..core.records import RunRecord
from ..data.config import DataConfig
from ..data.shards import PreparedData, prepare_data
from ..kernels.linear import BACKENDS
from ..kernels.recipe import Recipe
from ..models.convert import convert
from ..models.llama import LlamaConfig, LlamaModel
from .checkpoint import check_resumable
from .config import max_steps
from .init_from import read_init_checkpoint
from .module import state_mismatch
from .record import finished_record
from .settings import run_settings


class UsageError(ValueError):
    """Bad input from the command line, the configuration or the files it names (exit status 2)."""


@dataclass
class RunPlan:
    """A checked configuration: everything :func:`~bitlaw.train.cli.train` needs before it reads data or writes."""

    cfg: DictConfig
    run_dir: Path
    model: dict[str, Any]  # LlamaConfig fields; vocab_size is replaced by the tokenizer's
    recipe: Recipe
    data: DataConfig
    resume_from: Path | None  # the checkpoint to continue from
    init_from: Path | None = None  # the checkpoint file whose weights, model and recipe the run starts from

    @property
    def geometry(self) -> dict[str, Any]:
        """The batch settings a resumed run must share with its checkpoint."""
        return {"seed": self.cfg.seed, "seq_len": self.cfg.seq_len, "global_batch": self.cfg.global_batch}


@dataclass
class RunDefinition:
    """What the data set fixes: the model with the tokenizer's vocabulary, the number of optimizer steps, and the
    settings that define the run's result (:func:`bitlaw.train.settings.run_settings`)."""

    model: LlamaConfig
    steps: int
    settings: dict[str, Any]


def plan_run(cfg: DictConfig) -> RunPlan:
    """Check every setting that needs no data or compute; raise :class:`UsageError` naming the first bad one."""
    try:
        init = read_init_checkpoint(cfg.init_from) if cfg.init_from is not None else None
        if init is not None:  # the checkpoint's architecture and recipe replace the model and quant groups
            model, recipe = init.model, init.recipe
        else:
            model = OmegaConf.to_container(cfg.model, resolve=True)
            recipe = Recipe.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
        model_cfg = LlamaConfig.from_dict(model)
        with torch.device("meta"):
            meta_model = LlamaModel(model_cfg)
        if recipe.compressed:
            convert(meta_model, recipe)  # raises, naming the layer, if a block or group does not fit the width
        if init is not None:
            expected = {f"model.{name}": tensor for name, tensor in meta_model.state_dict().items()}
            mismatch = state_mismatch(expected, init.shapes)
            if mismatch:
                raise ValueError(f"init_from={cfg.init_from!r}: the weights of {init.path} do not fit its own model "
                                 f"and recipe ({mismatch})")
        _check_numbers(cfg, model_cfg)
        max_steps(cfg, model_cfg.params_non_embedding)
        _check_machine(cfg)
        data = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
        data.cache_dir = to_absolute_path(data.cache_dir)
        data.paths = [to_absolute_path(p) for p in data.paths]
        data.validate()
        run_dir = Path(cfg.run_dir)
        _check_writable(run_dir)
        return RunPlan(cfg, run_dir, model, recipe, data, _resume_path(cfg, run_dir),
                       init.path if init is not None else None)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def _check_numbers(cfg: DictConfig, model_cfg: LlamaConfig) -> None:
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


def _check_machine(cfg: DictConfig) -> None:
    """Refuse settings this machine cannot run, before anything is prepared."""
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={cfg.trainer.accelerator!r} needs a CUDA GPU and this machine has none; "
                         "allowed here: trainer=cpu")
    if cfg.backend == "triton" and cfg.trainer.accelerator not in ("gpu", "cuda") and not interpreted_triton():
        raise ValueError("backend='triton' runs the Triton kernels, which need a CUDA GPU (trainer=gpu), or "
                         "TRITON_INTERPRET=1 to run them slowly on the CPU; allowed here: backend=auto or reference")


def interpreted_triton() -> bool:
    """True when Triton kernels would run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_writable(run_dir: Path) -> None:
    problem = unwritable(run_dir)
    if problem:
        raise ValueError(f"{problem}; choose another run directory (run_dir=... or hydra.run.dir=...)")


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be created or written (its nearest existing ancestor is a file, or refuses a new
    entry: tried, not guessed from permission bits, which do not bind root), or None when it can."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"cannot create the directory {directory}: {existing} is a file"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".bitlaw-write-check-").cleanup()
    except OSError as err:
        return f"cannot write the directory {directory}: {existing} refuses new files ({err.strerror})"
    return None


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


def define_run(plan: RunPlan, data: PreparedData) -> RunDefinition:
    """The run as the data set fixes it; :class:`UsageError` when an ``init_from`` checkpoint's vocabulary is not the
    data set's tokenizer's."""
    cfg = plan.cfg
    if plan.init_from is not None and plan.model["vocab_size"] != data.vocab_size:
        raise UsageError(f"init_from={cfg.init_from!r}: the checkpoint's vocab_size={plan.model['vocab_size']} differs "
                         f"from the data set's tokenizer ({data.vocab_size} tokens, {data.tokenizer_path}); train on "
                         "data tokenized with the checkpoint's tokenizer (data.tokenizer=<its tokenizer.json>)")
    model = LlamaConfig.from_dict({**plan.model, "vocab_size": data.vocab_size})
    steps = max_steps(cfg, model.params_non_embedding)
    settings = run_settings(model.to_dict(), plan.recipe.to_dict(), data.meta["config_hash"],
                            OmegaConf.to_container(cfg.optim, resolve=True), cfg.seed, cfg.seq_len, cfg.global_batch,
                            steps, cfg.val_batches, cfg.trainer.precision)
    return RunDefinition(model, steps, settings)


def check_continuation(plan: RunPlan, settings: dict[str, Any]) -> int | RunRecord:
    """The step this run starts at (0, or the checkpoint's when resuming), or the record of a finished run with
    these settings (to skip). A checkpoint or record written with other settings raises :class:`UsageError`
    naming each difference (the settings compared: :data:`bitlaw.train.settings.SETTINGS_DOC`)."""
    try:
        if plan.cfg.resume != "never":
            finished = finished_record(plan.run_dir, settings)
            if finished is not None:
                return finished
        return 0 if plan.resume_from is None else check_resumable(plan.resume_from, settings)
    except ValueError as err:
        raise UsageError(str(err)) from None
