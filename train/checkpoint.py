"""Atomic checkpoint writes and checks that a checkpoint fits the run that resumes from it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .settings import refuse_changed


def atomic_write_bytes(path: str | os.PathLike[str], write) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact (``os.replace`` is atomic on POSIX). The file gets the mode a
    plain ``open`` would give it (``0o666`` less the umask), not mkstemp's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written checkpoint under its final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_write_bytes(path, lambda fh: torch.save(checkpoint, fh))


def check_resumable(path: str | os.PathLike[str], settings: dict[str, Any]) -> int:
    """Raise ValueError unless the checkpoint at ``path`` was written by a run with these ``settings``
    (:func:`bitlaw.train.settings.run_settings`), naming each that differs; return its ``global_step``.

    The checkpoint is memory-mapped, so only what is read is loaded."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"cannot read checkpoint {path} ({reason}): it is truncated or corrupt; resume from an "
                         "earlier one (resume=<path>), or resume=never to train from scratch") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError(f"{path} is not a bitlaw-train checkpoint (no global_step)")
    refuse_changed(f"checkpoint {path}", ckpt.get("bitlaw", {}).get("settings"), settings)
    return int(ckpt["global_step"])
