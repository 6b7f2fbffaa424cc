"""Writing an export directory safely: everything goes into a hidden sibling first, which replaces the target
only once it is complete."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def prepare_out(out: Path, force: bool) -> Path:
    """A new staging directory beside ``out``; FileExistsError when ``out`` exists and ``force`` is not set."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out``."""
    # The old export is removed only once the new one is completely written beside it.
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
