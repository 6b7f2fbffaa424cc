"""``bitlaw-train`` (also ``python -m bitlaw.train``): compose the config, build data, model, trainer; fit; record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from bitlaw.data.config import DataConfig
from bitlaw.data.shards import prepare_data
from bitlaw.kernels.linear import BACKENDS
from bitlaw.kernels.recipe import CONF_DIR, Recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel
from bitlaw.train.checkpoint import AtomicCheckpointIO, atomic_write_bytes, check_resumable
from bitlaw.train.config import max_steps, register_schema
from bitlaw.train.csvlog import ResumableCSVLogger
from bitlaw.train.datamodule import TokenDataModule
from bitlaw.train.module import LitLlama

register_schema()


def code_version() -> str:
    """The installed bitlaw version, plus the git commit when run from a checkout."""
    version = metadata.version("bitlaw") if _installed() else "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{version}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return version


def _installed() -> bool:
    try:
        metadata.version("bitlaw")
        return True
    except metadata.PackageNotFoundError:
        return False


def _validate(cfg: DictConfig) -> tuple[dict[str, Any], Recipe, DataConfig]:
    """Every check that needs no data or compute: runs before anything is prepared or written."""
    model_dict = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg = LlamaConfig.from_dict(model_dict)
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
    if cfg.backend is not None and cfg.backend not in BACKENDS:
        raise ValueError(f"backend={cfg.backend!r} is not allowed; allowed: {', '.join(BACKENDS)} (or null: "
                         "$BITLAW_BACKEND, else auto)")
    if cfg.logger.kind not in ("csv", "wandb"):
        raise ValueError(f"logger.kind={cfg.logger.kind!r} is not allowed; allowed: csv, wandb")
    max_steps(cfg, model_cfg.params_non_embedding)
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    data_cfg.cache_dir = hydra.utils.to_absolute_path(data_cfg.cache_dir)
    data_cfg.paths = [hydra.utils.to_absolute_path(p) for p in data_cfg.paths]
    data_cfg.validate()
    return model_dict, recipe, data_cfg


def _resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    path = Path(hydra.utils.to_absolute_path(cfg.resume))
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint (allowed: auto, never, or a path)")
    return path


def _finished_record(run_dir: Path, model: dict[str, Any], recipe: Recipe, run: dict[str, Any],
                     steps: int) -> dict[str, Any] | None:
    """The record of ``run_dir/run.json`` when this run already finished there, else None (no run.json).

    So that re-launching a sweep skips finished runs. Raises ValueError when the record was written with other
    settings (model shape, recipe, seed, seq_len, global_batch, steps): skipping would silently keep the wrong run.
    """
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    checks = [("model", record.get("model"), model), ("quant", record.get("recipe"), recipe.to_dict()),
              ("steps", record.get("steps"), steps), *((key, record.get(key), value) for key, value in run.items())]
    for key, old, new in checks:
        if old != new:
            raise ValueError(f"{path} records a finished run with {key} {old!r}, this run has {new!r}; use another "
                             "run directory, the original settings, or resume=never to train again from scratch")
    return record


def _loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [ResumableCSVLogger(str(run_dir))]
    if cfg.logger.kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:
            offline = not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file())
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, save_dir=str(run_dir),
                                   offline=offline, name=run_dir.name))
    return loggers


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` (the composed ``conf/train.yaml``); return its run record."""
    model_dict, recipe, data_cfg = _validate(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_path = _resume_path(cfg, run_dir)

    data = prepare_data(data_cfg, progress=cfg.trainer.enable_progress_bar)
    model_dict["vocab_size"] = data.vocab_size
    model_cfg = LlamaConfig.from_dict(model_dict)
    steps = max_steps(cfg, model_cfg.params_non_embedding)
    run = {"seed": cfg.seed, "seq_len": cfg.seq_len, "global_batch": cfg.global_batch}
    start_step = 0 if ckpt_path is None else check_resumable(ckpt_path, model_dict, recipe.to_dict(), run)
    if cfg.resume != "never":
        finished = _finished_record(run_dir, model_cfg.to_dict(), recipe, run, steps)
        if finished is not None:
            print(f"bitlaw-train: skipped {run_dir}: already finished (run.json, val_loss {finished['val_loss']:.4f}); "
                  "resume=never trains it again from scratch")
            return finished
    else:
        # Retraining from scratch: the old record must not make the directory look finished meanwhile.
        (run_dir / "run.json").unlink(missing_ok=True)

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_bytes(run_dir / "config.yaml", lambda fh: fh.write(resolved.encode()))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LitLlama(model_dict, recipe.to_dict(), OmegaConf.to_container(cfg.optim, resolve=True), steps, run,
                      mask_stats_every=cfg.mask_stats_every, compile=cfg.compile, peak_flops=cfg.peak_flops,
                      backend=cfg.backend)
    module.tokenizer_path = str(data.tokenizer_path)
    datamodule = TokenDataModule(data, cfg.seq_len, cfg.global_batch, cfg.seed, steps, cfg.val_batches)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_steps"] = steps
    accumulate = trainer_kwargs["accumulate_grad_batches"]
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                                  auto_insert_metric_name=False, every_n_train_steps=cfg.ckpt_every,
                                  save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        **trainer_kwargs, default_root_dir=str(run_dir), logger=_loggers(cfg, run_dir), callbacks=[checkpoints],
        plugins=[AtomicCheckpointIO()], gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=cfg.val_every * accumulate, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        use_distributed_sampler=False, max_epochs=-1)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except FloatingPointError as err:
        last = run_dir / "checkpoints" / "last.ckpt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
        raise SystemExit(f"bitlaw-train: stopped: {err}; {kept}") from None
    train_seconds = time.perf_counter() - started
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    val_loss = float(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"])
    tokens_per_step = cfg.global_batch * cfg.seq_len
    record = {
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
        "tokens_per_s": (trainer.global_step - start_step) * tokens_per_step / train_seconds,
        "unigram_entropy_nats": data.unigram_entropy_nats,
        "data": {"directory": str(data.directory), "config_hash": data.meta["config_hash"]},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.trainer.accelerator == "gpu"
        else "cpu",
        "world_size": trainer.world_size,
        "code_version": code_version(),
    }
    if trainer.is_global_zero:
        text = json.dumps(record, indent=2) + "\n"
        atomic_write_bytes(run_dir / "run.json", lambda fh: fh.write(text.encode()))
        print(f"final validation loss {val_loss:.4f} nats/token; unigram entropy of the corpus "
              f"{data.unigram_entropy_nats:.4f} nats/token; {record['tokens']:,} tokens in {trainer.global_step} "
              f"steps; run record {run_dir / 'run.json'}")
    return record


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; configuration errors exit with status 2 and a one-line message."""
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"bitlaw-train: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
