"""``bitlaw-train`` (also ``python -m bitlaw.train``): one pretraining run, as a sequence of steps.

:func:`train` reads top to bottom: :func:`plan_run` checks the whole configuration before anything is read or
written; :func:`prepare_run_data` tokenizes the corpus once (or reuses it); a finished run is skipped; then the
model, the data module and the Lightning trainer are built (:func:`build_trainer` instantiates the ``logger`` and
``callbacks`` groups), ``fit`` runs, and :func:`final_record` writes ``run.json``.

Bad input (configuration, data files, a checkpoint or record of a run with other settings) raises
:class:`UsageError`: ``bitlaw-train`` prints it as one line and exits with status 2. A non-finite loss stops every
rank (:class:`~bitlaw.train.callbacks.NonFiniteLossError`, one line, status 1). SIGTERM, SIGINT or SIGUSR1 stop it
at the next step boundary with a checkpoint (:class:`~bitlaw.train.callbacks.Interrupted`, one line, status 128 +
the signal's number); running the same command resumes. Anything else is a bug or a fault of the machine and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ..core.config import CONF_DIR
from ..data.config import DataConfig
from ..data.shards import PreparedData, prepare_data
from ..kernels.linear import BACKENDS
from ..kernels.recipe import Recipe
from ..models.convert import convert
from ..models.llama import LlamaConfig, LlamaModel
from .callbacks import Interrupted, NonFiniteLossError, Preemption, Throughput
from .checkpoint import AtomicCheckpointIO, atomic_write_bytes, check_resumable
from .config import max_steps, register_configs
from .datamodule import TokenDataModule
from .module import LitLlama, state_mismatch
from .record import code_version, finished_record, write_record
from .settings import run_settings

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
    init_from: Path | None = None  # the checkpoint file whose weights, model and recipe the run starts from

    @property
    def geometry(self) -> dict[str, Any]:
        """The batch settings a resumed run must share with its checkpoint."""
        return {"seed": self.cfg.seed, "seq_len": self.cfg.seq_len, "global_batch": self.cfg.global_batch}


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


INIT_FROM_ALLOWED = ("allowed: a bitlaw checkpoint file (a torch-saved dict with 'bitlaw' {'model', 'recipe', ...} "
                     "and 'state_dict' {'model.<parameter>': tensor}: a bitlaw-train *.ckpt or the checkpoint "
                     "bitlaw-compress writes to heal), a run directory holding checkpoints/last.ckpt, or null "
                     "(random init)")


@dataclass
class InitCheckpoint:
    """What ``init_from`` names, checked: the checkpoint file and its architecture, without its tensors' data."""

    path: Path  # absolute: the file itself, or a run directory's checkpoints/last.ckpt
    model: dict[str, Any]  # LlamaConfig fields, vocab_size included
    recipe: Recipe
    shapes: dict[str, torch.Size]  # state_dict key ("model.<parameter>") → shape


def resolve_init_from(source: str) -> Path:
    """``init_from`` as an absolute checkpoint file: a run directory means its ``checkpoints/last.ckpt`` (as
    ``bitlaw.deploy.load.resolve_source`` maps it; train does not import deploy). FileNotFoundError naming the
    path and what is allowed when there is none."""
    path = Path(to_absolute_path(str(source)))
    if not path.exists():
        raise FileNotFoundError(f"init_from={source!r}: {path} does not exist; {INIT_FROM_ALLOWED}")
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"init_from={source!r}: the directory {path} has no checkpoints/last.ckpt; "
                                    f"{INIT_FROM_ALLOWED}")
        return last
    return path


def load_init_checkpoint(path: Path, source: str) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (tensors memory-mapped when the file allows it, so reading the header
    costs no copy of the weights); ValueError naming ``source`` and what is allowed when it is not a bitlaw
    checkpoint."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # anything torch cannot read is not a checkpoint, whatever the reason
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"init_from={source!r}: {path} is not a bitlaw checkpoint (torch cannot read it: "
                         f"{reason}); {INIT_FROM_ALLOWED}") from None
    info = ckpt.get("bitlaw") if isinstance(ckpt, dict) else None
    if not (isinstance(info, dict) and {"model", "recipe"} <= set(info) and isinstance(ckpt.get("state_dict"), dict)):
        raise ValueError(f"init_from={source!r}: {path} is not a bitlaw checkpoint (no 'bitlaw' entry with 'model' "
                         f"and 'recipe', or no 'state_dict'); {INIT_FROM_ALLOWED}")
    return ckpt


def read_init_checkpoint(source: str) -> InitCheckpoint:
    """Check what ``init_from`` names (:func:`resolve_init_from`, :func:`load_init_checkpoint`) and return its
    architecture and recipe; FileNotFoundError or ValueError naming the path and what is allowed."""
    path = resolve_init_from(source)
    ckpt = load_init_checkpoint(path, source)
    try:
        model = LlamaConfig.from_dict(dict(ckpt["bitlaw"]["model"])).to_dict()
        recipe = Recipe.from_dict(dict(ckpt["bitlaw"]["recipe"]))
    except (ValueError, TypeError) as err:
        raise ValueError(f"init_from={source!r}: {path} records a model or recipe bitlaw cannot build "
                         f"({err})") from None
    shapes = {key: value.shape for key, value in ckpt["state_dict"].items() if isinstance(value, torch.Tensor)}
    return InitCheckpoint(path, model, recipe, shapes)


def init_weights(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the (already checked) checkpoint at ``path``, memory-mapped where possible."""
    return load_init_checkpoint(path, str(path))["state_dict"]


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` (the composed ``conf/train.yaml``); return its run record."""
    plan = plan_run(cfg)
    data = prepare_run_data(plan)
    if plan.init_from is not None and plan.model["vocab_size"] != data.vocab_size:
        raise UsageError(f"init_from={cfg.init_from!r}: the checkpoint's vocab_size={plan.model['vocab_size']} differs "
                         f"from the data set's tokenizer ({data.vocab_size} tokens, {data.tokenizer_path}); train on "
                         "data tokenized with the checkpoint's tokenizer (data.tokenizer=<its tokenizer.json>)")
    model_cfg = LlamaConfig.from_dict({**plan.model, "vocab_size": data.vocab_size})
    steps = max_steps(cfg, model_cfg.params_non_embedding)
    settings = run_settings(model_cfg.to_dict(), plan.recipe.to_dict(), data.meta["config_hash"],
                            OmegaConf.to_container(cfg.optim, resolve=True), cfg.seed, cfg.seq_len, cfg.global_batch,
                            steps, cfg.val_batches, cfg.trainer.precision)
    start_step = _check_continuation(plan, settings)
    if isinstance(start_step, dict):
        return start_step  # a finished run with these settings: skipped
    if cfg.resume == "never":
        # Retraining from scratch: the old record and metrics must not be mistaken for this run's.
        for name in ("run.json", "metrics.csv"):
            (plan.run_dir / name).unlink(missing_ok=True)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LitLlama(model_cfg.to_dict(), plan.recipe.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True),
                      steps, plan.geometry, mask_stats_every=cfg.mask_stats_every, compile=cfg.compile,
                      backend=cfg.backend, settings=settings)
    if plan.init_from is not None:
        module.init_from = str(plan.init_from)
        if plan.resume_from is None:  # resuming: the weights come from the resume checkpoint
            try:
                module.load_weights(init_weights(plan.init_from), str(plan.init_from))
            except ValueError as err:
                raise UsageError(f"init_from={cfg.init_from!r}: {err}") from None
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, plan.run_dir, model_cfg, plan.recipe if plan.init_from is not None else None)
    module.tokenizer_path = str(data.tokenizer_path)
    module.data_source = {"directory": str(data.directory), "config_hash": data.meta["config_hash"]}
    datamodule = TokenDataModule(data, cfg.seq_len, cfg.global_batch, cfg.seed, steps, cfg.val_batches)
    trainer = build_trainer(cfg, steps)
    if trainer.is_global_zero and plan.init_from is not None:
        print(f"{PROG}: init_from {plan.init_from}: model and recipe from the checkpoint (n_layer={model_cfg.n_layer}, "
              f"d_model={model_cfg.d_model}, recipe {plan.recipe.name}); " + (
                  "fresh optimizer and schedule" if plan.resume_from is None else
                  f"weights, optimizer and schedule from the resume checkpoint {plan.resume_from}"))
    if trainer.is_global_zero:
        print(f"{PROG}: {model_cfg.n_layer} layers × d_model {model_cfg.d_model}, N = "
              f"{model_cfg.params_non_embedding:,} non-embedding parameters, recipe {plan.recipe.name}; {steps} steps "
              f"of {cfg.global_batch} × {cfg.seq_len} tokens" + (f", resuming at step {start_step}" if start_step
                                                                else "") + f"; run directory {plan.run_dir}")
    evaluate = None  # the checkpoint to evaluate, when there is nothing left to train
    wall_tokens_per_s = None
    if start_step < steps:
        started = time.perf_counter()
        try:
            trainer.fit(module, datamodule=datamodule,
                        ckpt_path=str(plan.resume_from) if plan.resume_from else None)
        except SIGTERMException:
            preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
            if preemption is not None and preemption.interruption is not None:
                raise preemption.interruption from None
            raise Interrupted("SIGTERM", trainer.global_step, None, False) from None
        wall_tokens_per_s = ((steps - start_step) * cfg.global_batch * cfg.seq_len
                             / (time.perf_counter() - started))
    else:
        evaluate = str(plan.resume_from)  # stopped after its last step, before the record was written
    val_loss = float(trainer.validate(module, datamodule=datamodule, ckpt_path=evaluate, verbose=False)[0]["val/loss"])
    record = final_record(cfg, trainer, module, data, model_cfg, plan.recipe, val_loss, steps, wall_tokens_per_s)
    record["settings"] = settings
    record["init_from"] = str(plan.init_from) if plan.init_from is not None else None
    if plan.init_from is not None:
        record["model_preset"] = None  # the model group was not used: the architecture is the checkpoint's
    if trainer.is_global_zero:
        path = write_record(plan.run_dir, record)
        print(f"final validation loss {val_loss:.4f} nats/token (the first {cfg.val_batches} × {cfg.global_batch} "
              f"windows of the validation split); unigram entropy of the corpus {data.unigram_entropy_nats:.4f} "
              f"nats/token; {record['tokens']:,} tokens in {steps} steps; run record {path}")
        for kind, choice in record["backends"].items():
            if choice["backend"] != "triton":
                print(f"{PROG}: {kind} ran the {choice['backend']} path: {choice['reason']}")
                break  # one line: every kind shares the recipe, so the reason is the same
    return record


def _check_continuation(plan: RunPlan, settings: dict[str, Any]) -> int | dict[str, Any]:
    """The step this run starts at (0, or the checkpoint's when resuming), or the record of a finished run with
    these settings (to skip). A checkpoint or record written with other settings raises :class:`UsageError`
    naming each difference (the settings compared: :data:`bitlaw.train.settings.SETTINGS_DOC`)."""
    try:
        if plan.cfg.resume != "never":
            finished = finished_record(plan.run_dir, settings)
            if finished is not None:
                print(f"{PROG}: skipped {plan.run_dir}: already finished (run.json, val_loss "
                      f"{finished['val_loss']:.4f}); resume=never trains it again from scratch")
                return finished
        return 0 if plan.resume_from is None else check_resumable(plan.resume_from, settings)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _write_config(cfg: DictConfig, run_dir: Path, model_cfg: LlamaConfig, init_recipe: Recipe | None = None) -> None:
    """``config.yaml``: the resolved config with the values the run uses (the tokenizer's vocabulary size; with
    ``init_from``, the checkpoint's model and recipe, ``init_recipe``, in place of the model and quant groups)."""
    used = OmegaConf.to_container(cfg, resolve=True)
    used["model"]["vocab_size"] = model_cfg.vocab_size
    if init_recipe is not None:
        used["model"], used["quant"] = model_cfg.to_dict(), init_recipe.to_dict()
    text = OmegaConf.to_yaml(OmegaConf.create(used))
    atomic_write_bytes(run_dir / "config.yaml", lambda fh: fh.write(text.encode()))


def final_record(cfg: DictConfig, trainer: L.Trainer, module: LitLlama, data: PreparedData, model_cfg: LlamaConfig,
                 recipe: Recipe, val_loss: float, steps: int, wall_tokens_per_s: float | None) -> dict[str, Any]:
    """The run record (``run.json``) of a run finished after ``steps`` optimizer steps; tokens/s of this attempt
    from the ``Throughput`` callback (training steps only) when it ran, else from the wall time of ``fit``
    (validation and checkpoints included; None when this attempt trained no step), as ``throughput`` says."""
    tokens_per_step = cfg.global_batch * cfg.seq_len
    monitor = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    throughput: dict[str, Any] = {"source": "wall clock of fit" if wall_tokens_per_s else
                                  "none: this attempt trained no step (resumed at the final step)",
                                  "tokens_per_s": wall_tokens_per_s, "mfu": None, "peak_flops": None}
    if monitor is not None and monitor.summary and wall_tokens_per_s:
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
        "tokens": steps * tokens_per_step,
        "steps": steps,
        "val_loss": val_loss,
        "val_windows": (f"training's validation windows: the first {cfg.val_batches} batches of {cfg.global_batch} "
                        f"windows (seq_len {cfg.seq_len}) of the validation split; bitlaw-eval <run> --windows "
                        "training evaluates the same ones, bitlaw-eval <run> the whole split"),
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
