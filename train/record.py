"""What a run directory records about its run: ``run.json`` (the :class:`~bitlaw.core.records.RunRecord`, written when
the run finishes) and ``config.yaml`` (the resolved configuration, written when it starts).

``run.json`` is read by ``bitlaw-fit`` (``bitlaw.scaling.runs``), ``bitlaw-eval``, ``bitlaw-export`` and by
``bitlaw-train`` itself, which skips a run directory whose record shows the same run finished.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..core.records import RUN_RECORD_FILE, DataSource, RunRecord, Throughput
from ..kernels.recipe import Recipe
from ..models.llama import LlamaConfig
from .callbacks import Throughput as ThroughputCallback
from .checkpoint import atomic_write_bytes
from .settings import refuse_changed

if TYPE_CHECKING:
    import lightning as L

    from ..data.shards import PreparedData
    from .module import LitLlama

RESULT_FILES = (RUN_RECORD_FILE, "metrics.csv")  # what a run's training writes as its result


def code_version() -> str:
    """The installed bitlaw version, plus the git commit when run from a checkout (``0.1.0+g1234abc``)."""
    try:
        version = metadata.version("bitlaw")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{version}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return version


def finished_record(run_dir: Path, settings: dict[str, Any]) -> RunRecord | None:
    """The record in ``run_dir`` when this run already finished there, else None (no run.json).

    Raises ValueError, naming each differing setting with its two values, when the record was written by a run
    with other settings (:func:`~bitlaw.train.settings.run_settings`): skipping would silently return the wrong
    run's result; and naming the file when it is not a readable record.
    """
    path = run_dir / RUN_RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = RunRecord.read(path)
    except ValueError as err:
        raise ValueError(f"{err}; move it away or resume=never") from None
    refuse_changed(f"the finished run {path}", record.settings, settings)
    return record


def write_record(run_dir: Path, record: RunRecord) -> Path:
    """Write ``record`` as ``run_dir/run.json`` atomically; returns the path."""
    path = run_dir / RUN_RECORD_FILE
    text = record.to_json()
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    return path


def discard_results(run_dir: Path) -> None:
    """Remove a finished run's record and metrics before it is trained again from scratch (``resume=never``), so
    they are never mistaken for the new run's."""
    for name in RESULT_FILES:
        (run_dir / name).unlink(missing_ok=True)


def write_config(cfg: DictConfig, run_dir: Path, model_cfg: LlamaConfig, init_recipe: Recipe | None = None) -> None:
    """``config.yaml``: the resolved config with the values the run uses (the tokenizer's vocabulary size; with
    ``init_from``, the checkpoint's model and recipe, ``init_recipe``, in place of the model and quant groups)."""
    used = OmegaConf.to_container(cfg, resolve=True)
    used["model"]["vocab_size"] = model_cfg.vocab_size
    if init_recipe is not None:
        used["model"], used["quant"] = model_cfg.to_dict(), init_recipe.to_dict()
    text = OmegaConf.to_yaml(OmegaConf.create(used))
    atomic_write_bytes(run_dir / "config.yaml", lambda fh: fh.write(text.encode()))


def measured_throughput(cfg: DictConfig, trainer: L.Trainer, module: LitLlama,
                        wall_tokens_per_s: float | None) -> Throughput:
    """Tokens/s of this attempt from the ``Throughput`` callback (training steps only) when it ran, else from the
    wall time of ``fit`` (validation and checkpoints included; None when this attempt trained no step), with MFU
    when the device's peak is known; ``source`` says which."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputCallback)), None)
    if monitor is None or not monitor.summary or not wall_tokens_per_s:
        return Throughput("wall clock of fit" if wall_tokens_per_s else
                          "none: this attempt trained no step (resumed at the final step)", wall_tokens_per_s)
    summary = monitor.summary
    per_device = summary["tokens_per_device"] / summary["seconds"]
    tokens_per_step = cfg.global_batch * cfg.seq_len
    flops_per_token = module.flops_per_batch / (tokens_per_step / trainer.world_size / trainer.accumulate_grad_batches)
    return Throughput("Throughput callback (training steps, validation excluded)", per_device * trainer.world_size,
                      flops_per_token * per_device / summary["peak_flops"] if summary["peak_flops"] else None,
                      summary["peak_flops"])


def final_record(cfg: DictConfig, trainer: L.Trainer, module: LitLlama, data: PreparedData, model_cfg: LlamaConfig,
                 recipe: Recipe, val_loss: float, steps: int, throughput: Throughput, settings: dict[str, Any],
                 init_from: Path | None) -> RunRecord:
    """The run record of a run finished after ``steps`` optimizer steps, validated at ``val_loss`` on training's
    validation windows. With ``init_from`` the model group was not used: ``model_preset`` is None."""
    preset = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    return RunRecord(
        params_non_embedding=model_cfg.params_non_embedding,
        params_total=model_cfg.params_total,
        tokens=steps * cfg.global_batch * cfg.seq_len,
        steps=steps,
        val_loss=val_loss,
        val_windows=(f"training's validation windows: the first {cfg.val_batches} batches of {cfg.global_batch} "
                     f"windows (seq_len {cfg.seq_len}) of the validation split; bitlaw-eval <run> --windows "
                     "training evaluates the same ones, bitlaw-eval <run> the whole split"),
        recipe=recipe.to_dict(),
        model=model_cfg.to_dict(),
        model_preset=None if init_from is not None else preset,
        seq_len=cfg.seq_len,
        global_batch=cfg.global_batch,
        val_batches=cfg.val_batches,
        lr=cfg.optim.lr,
        seed=cfg.seed,
        tokens_per_s=throughput.tokens_per_s,
        throughput=throughput,
        backends=module.backend_report(),
        unigram_entropy_nats=data.unigram_entropy_nats,
        data=DataSource(str(data.directory), data.meta["config_hash"]),
        device=torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else "cpu",
        world_size=trainer.world_size,
        code_version=code_version(),
        settings=settings,
        init_from=str(init_from) if init_from is not None else None,
    )
