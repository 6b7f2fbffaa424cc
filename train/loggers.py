"""Loggers of a bitlaw training run, instantiated from ``conf/logger/*.yaml`` (``_target_``).

:class:`MetricsCSVLogger` keeps ``<run_dir>/metrics.csv`` as one row per optimizer step and one column per metric,
across resumes: a step logged again (replayed after a resume) replaces its earlier values instead of adding a row.
:func:`wandb_logger` is Lightning's ``WandbLogger``, offline unless an API key is configured.
"""

from __future__ import annotations

import csv
import io
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from .checkpoint import atomic_write_bytes


class MetricsCSVLogger(Logger):
    """``<save_dir>/metrics.csv``: a ``step`` column, then one column per metric name (sorted), one row per step.

    Rows already in the file (an earlier attempt of the same run) are read on the first write and kept; values
    logged again for a step overwrite that step's earlier values. The file is rewritten atomically every
    ``flush_every`` steps, after each checkpoint and when the run ends, so a crash leaves the previous complete file
with every step up to the last checkpoint.
    Hyperparameters are not written here (the run directory holds ``config.yaml``).
    """

    def __init__(self, save_dir: str, flush_every: int = 50):
        super().__init__()
        self._save_dir = save_dir
        self.path = Path(save_dir) / "metrics.csv"
        self.flush_every = flush_every
        self._rows: dict[int, dict[str, float]] | None = None
        self._last_flush_step = -1
        self._dirty = False
        self._flush_next = False

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Not written: ``config.yaml`` and ``run.json`` in the run directory record the settings."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rows = self._loaded()
        row = rows.setdefault(int(step if step is not None else max(rows, default=-1) + 1), {})
        row.update({key: float(value) for key, value in metrics.items() if key != "epoch"})
        self._dirty = True

    @rank_zero_only
    def save(self) -> None:
        # Lightning calls save() after every log_metrics; write every flush_every steps and after a checkpoint.
        due = self._rows and max(self._rows) - self._last_flush_step >= self.flush_every
        if self._dirty and (due or self._flush_next):
            self._write()
            self._flush_next = False

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # Lightning checkpoints a step before it logs that step's metrics: write at the next save(), which follows
        # them, so every step up to the checkpoint is on disk and a run killed later loses no row it will not replay.
        self._flush_next = True

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._dirty:
            self._write()

    def _loaded(self) -> dict[int, dict[str, float]]:
        if self._rows is None:
            self._rows = read_metrics(self.path) if self.path.is_file() else {}
        return self._rows

    def _write(self) -> None:
        rows = self._loaded()
        keys = sorted({key for row in rows.values() for key in row})
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["step", *keys])
        for step in sorted(rows):
            writer.writerow([step, *(_format(rows[step].get(key)) for key in keys)])
        atomic_write_bytes(self.path, lambda fh: fh.write(buffer.getvalue().encode()))
        self._last_flush_step = max(rows, default=-1)
        self._dirty = False


def _format(value: float | None) -> str:
    return "" if value is None else repr(value)


def read_metrics(path: str | os.PathLike[str]) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from a ``metrics.csv`` written by :class:`MetricsCSVLogger` (empty cells
    skipped). Raises ValueError naming the file when it is not such a file."""
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path} is not a bitlaw metrics.csv: no 'step' column (header {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                step = int(row.pop("step"))
                rows.setdefault(step, {}).update({key: float(value) for key, value in row.items() if value})
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}, line {line}: {err}") from None
    return rows


def wandb_logger(save_dir: str, name: str | None = None, project: str = "bitlaw", entity: str | None = None,
                 offline: bool | None = None) -> WandbLogger:
    """Lightning's ``WandbLogger`` writing under ``save_dir``, the run named ``name`` (default: the directory's
    name); ``offline=None`` means offline unless an API key is configured (``$WANDB_API_KEY`` or ``~/.netrc``), so a
    run never blocks on a login prompt."""
    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file())
    return WandbLogger(project=project, entity=entity, save_dir=save_dir, offline=offline,
                       name=name or Path(save_dir).name)
