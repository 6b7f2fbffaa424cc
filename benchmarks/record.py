"""Benchmark records: every benchmark, profile and study command writes its results as one JSON file per record, and
BENCHMARKS.md is generated from those files (``python -m bitlaw.benchmarks.report``).

A :class:`BenchmarkRecord` holds what a reader needs to trust a figure: the command as it was run, the device, the
date, the commit of the code that ran (``+dirty`` when tracked files differed from it), the library versions, and the
figures themselves (``rows``: one dict per table row, raw numbers; ``notes``: anything else, e.g. an estimate's
assumptions or a fit's summary). ``kind`` says what sort of figure it is: ``measured`` (run and timed or evaluated),
``compiled`` (read from compiled code without running it) or ``estimated`` (computed from a model, not run).
``module`` names the module whose ``render(record) -> str`` turns the record into its Markdown section.

Records are written to ``benchmarks/records/<benchmark>.json`` under the working directory by default (run the
commands from the repository root to update the committed records); a new run of a benchmark replaces its record,
and git keeps the history.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

RECORDS_DIR = Path("benchmarks") / "records"
KINDS = ("measured", "compiled", "estimated")
# Files a benchmark run itself writes: they never make the code it ran "dirty".
_OUTPUTS = ("benchmarks/records/", "BENCHMARKS.md")


@dataclass
class BenchmarkRecord:
    """One benchmark result (see the module docstring). ``benchmark`` is its id and file name
    (``kernels-reference-cpu``); ``title`` heads its section in BENCHMARKS.md."""

    VERSION: ClassVar[int] = 1

    benchmark: str
    title: str
    kind: str
    module: str
    command: str
    rows: list[dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    commit: str = ""
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"benchmark record {self.benchmark!r}: kind={self.kind!r} is not allowed; allowed: "
                             f"{', '.join(KINDS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> BenchmarkRecord:
        """The record in a parsed JSON file; ValueError naming ``source`` and the missing fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: benchmark record lacks {', '.join(missing)}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: benchmark record has unknown fields {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False) + "\n"


def git_commit(root: Path | None = None) -> str:
    """The short commit of the checkout the code runs from, ``+dirty`` when tracked files differ from it (the
    benchmark outputs excepted), or ``unknown`` outside a git checkout."""
    root = root or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = [line for line in changed if not line[3:].startswith(_OUTPUTS)]
    return sha + ("+dirty" if dirty else "")


def device_description() -> str:
    """The device the benchmark ran on: the CUDA device's name, or the CPU with torch's thread count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python, torch and triton versions, plus those of the distributions named in ``extra`` that are installed."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def command_line(module: str, argv: list[str] | None) -> str:
    """The command as a user types it: ``python -m <module> <arguments>``."""
    arguments = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *arguments])


def write_record(record: BenchmarkRecord, directory: Path | None = RECORDS_DIR, *,
                 versions: tuple[str, ...] = ()) -> Path | None:
    """Stamp ``record`` with today's date (UTC), the commit, the device and the library versions (each only when not
    already set), and write it to ``directory/<benchmark>.json``; returns the path. ``directory=None`` writes
    nothing (the commands' ``--no-record``)."""
    record.date = record.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    record.commit = record.commit or git_commit()
    record.device = record.device or device_description()
    record.versions = record.versions or library_versions(versions)
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.benchmark}.json"
    path.write_text(record.to_json(), encoding="utf-8")
    return path


def read_records(directory: Path = RECORDS_DIR) -> list[BenchmarkRecord]:
    """Every record in ``directory``, sorted by benchmark id; ValueError naming a file that is not a record."""
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        records.append(BenchmarkRecord.from_dict(data, str(path)))
    return records
