"""The run record, ``<run_dir>/run.json``: what a finished training run was and what it measured.

Written by ``bitlaw-train`` on global rank 0 when a run ends; read by ``bitlaw-fit`` (``bitlaw.scaling.runs``), by
``bitlaw-eval`` and by ``bitlaw-train`` itself, which skips a run directory whose record shows the same run
finished.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes
from .settings import refuse_changed

RECORD_FILE = "run.json"


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


def finished_record(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record in ``run_dir`` when this run already finished there, else None (no run.json).

    Raises ValueError, naming each differing setting with its two values, when the record was written by a run
    with other settings (:func:`run_settings`): skipping would silently return the wrong run's result.
    """
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable run record ({err}); move it away or resume=never") from None
    refuse_changed(f"the finished run {path}", record.get("settings"), settings)
    return record


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``run_dir/run.json`` atomically; returns the path."""
    path = run_dir / RECORD_FILE
    text = json.dumps(record, indent=2) + "\n"
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    return path
