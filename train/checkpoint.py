"""Atomic checkpoint writes and checks that a checkpoint fits the run that resumes from it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write_bytes(path: str | os.PathLike[str], write) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact (``os.replace`` is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written checkpoint under its final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_write_bytes(path, lambda fh: torch.save(checkpoint, fh))


def check_resumable(path: str | os.PathLike[str], model: dict[str, Any], recipe: dict[str, Any],
                    run: dict[str, Any]) -> int:
    """Raise ValueError unless the checkpoint at ``path`` was written by a run with the same model shape,
    recipe and batch geometry (``run``: seq_len, global_batch, seed); return its ``global_step``.

    The checkpoint is memory-mapped, so only what is read is loaded."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    saved = ckpt.get("hyper_parameters", {})
    checks = [("model", saved.get("model_config"), model), ("quant", saved.get("recipe"), recipe)]
    checks += [(key, saved.get("run", {}).get(key), value) for key, value in run.items()]
    for key, old, new in checks:
        if old != new:
            raise ValueError(f"checkpoint {path} does not fit this run: {key} was {old!r} there, is {new!r} now; "
                             "use another run directory, resume=never, or the original settings")
    return int(ckpt["global_step"])
