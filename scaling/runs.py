"""The run table: (N, D, loss, recipe) rows collected from run records, CSV files or a wandb project.

Sources:

- run directories: every ``run.json`` written by ``bitlaw-train`` below a directory (searched recursively), or a
  ``run.json`` file itself. The keys read are ``params_non_embedding`` (N), ``tokens`` (D), ``val_loss`` and
  ``recipe`` (the :class:`kernels.recipe.Recipe` dict).
- CSV files with the columns ``N, D, loss, recipe`` (other columns are ignored), ``recipe`` naming a preset of
  ``conf/quant/`` — for published or external runs.
- a wandb project (:func:`read_wandb`; needs network and the ``wandb`` package).

Rows are validated when read (positive finite N, D, loss; a known recipe), so the fit never sees bad input.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.records import RunRecord
from ..kernels.recipe import Recipe, load_recipe, recipe_names

CSV_COLUMNS = ("N", "D", "loss", "recipe")
SPEED_COLUMNS = ("tokens_per_s", "backend", "device")  # optional in CSV input
WANDB_KEYS = (*RunRecord.REQUIRED, "tokens_per_s", "device")  # what a wandb run's summary must or may carry


@dataclass(frozen=True)
class Run:
    """One training run: ``N`` non-embedding parameters, ``D`` training tokens, final validation ``loss``
    (nats/token), the ``recipe`` it was trained with, and ``source`` (file and line or run id) for messages.

    Speed, when the source records it: ``tokens_per_s``, ``backend`` (the path its quantized layers ran:
    ``triton``, ``reference``, ``mixed``, or ``none`` for a model without quantized layers) and ``device``.
    """

    N: float
    D: float
    loss: float
    recipe: Recipe
    source: str
    tokens_per_s: float | None = None
    backend: str | None = None
    device: str | None = None

    @property
    def recipe_name(self) -> str:
        return self.recipe.name


def _positive(value: Any, what: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what}={value!r} is not a number; allowed: a positive finite number") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: {what}={value!r} is not allowed; allowed: a positive finite number")
    return number


def _preset(name: str, where: str, known: dict[str, Recipe] | None = None) -> Recipe:
    name = name.strip()
    if known and name in known:
        return known[name]
    if name not in recipe_names():
        raise ValueError(f"{where}: unknown recipe {name!r}; allowed (presets of conf/quant/): "
                         f"{', '.join(recipe_names())}")
    return load_recipe(name)


def run_from_record(record: RunRecord, source: str) -> Run:
    """A :class:`Run` from a run record; ValueError names ``source`` and the field that is not allowed."""
    try:
        recipe = _preset(record.recipe, source) if isinstance(record.recipe, str) else Recipe.from_dict(record.recipe)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    speed = record.tokens_per_s
    return Run(N=_positive(record.params_non_embedding, "params_non_embedding", source),
               D=_positive(record.tokens, "tokens", source),
               loss=_positive(record.val_loss, "val_loss", source), recipe=recipe, source=source,
               tokens_per_s=None if speed is None else _positive(speed, "tokens_per_s", source),
               backend=backend_summary(record.backends) if record.backends is not None else None, device=record.device)


def backend_summary(backends: dict[str, Any]) -> str:
    """One word for a run record's ``backends`` (layer kind → {"backend", "reason"}): the path every quantized layer
    took (``triton`` or ``reference``), ``mixed``, or ``none`` when the model has no quantized layer."""
    paths = {entry.get("backend") for entry in backends.values() if isinstance(entry, dict)}
    if not paths:
        return "none"
    return paths.pop() if len(paths) == 1 else "mixed"


def read_run_json(path: str | Path) -> Run:
    """The run recorded in one ``run.json`` file."""
    path = Path(path)
    return run_from_record(RunRecord.read(path), str(path))


def read_run_dirs(directory: str | Path) -> list[Run]:
    """Every ``run.json`` below ``directory`` (recursively), sorted by path.

    Raises FileNotFoundError when there is none. Directories that look like started but unfinished runs (a
    ``config.yaml`` without ``run.json``) are skipped with a warning naming them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    records = sorted(directory.rglob("run.json"))
    if not records:
        raise FileNotFoundError(f"{directory}: no run.json in this directory or below it; a run directory gets "
                                "its run.json when bitlaw-train finishes (pass finished run directories, a "
                                "sweep directory holding them, or a CSV with columns N, D, loss, recipe)")
    finished = {p.parent for p in records}
    # bitlaw-train writes <run_dir>/config.yaml first and run.json last; Hydra's own copies live in .hydra/ and,
    # one per attempt, in .hydra/<time>/ (docs/training.md §4): none of those is a run directory.
    unfinished = sorted(str(p.parent) for p in directory.rglob("config.yaml")
                        if ".hydra" not in p.relative_to(directory).parts and p.parent not in finished)
    if unfinished:
        warnings.warn(f"skipped {len(unfinished)} unfinished run director{'y' if len(unfinished) == 1 else 'ies'} "
                      f"(config.yaml but no run.json): {', '.join(unfinished[:5])}"
                      f"{' …' if len(unfinished) > 5 else ''}", stacklevel=2)
    return [read_run_json(p) for p in records]


def read_csv(path: str | Path, known: dict[str, Recipe] | None = None) -> list[Run]:
    """Rows of a CSV file with the columns ``N, D, loss, recipe`` (a ``conf/quant`` preset name, or a name in
    ``known``); extra columns are ignored. Raises ValueError naming the missing column(s), or the line of a bad
    value or unknown recipe."""
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [col for col in CSV_COLUMNS if col not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(CSV_COLUMNS)} "
                             f"(found: {', '.join(header) or 'no header'})")
        reader.fieldnames = header
        runs = []
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            speed = (row.get("tokens_per_s") or "").strip()
            runs.append(Run(N=_positive(row["N"], "N", where), D=_positive(row["D"], "D", where),
                            loss=_positive(row["loss"], "loss", where),
                            recipe=_preset(row["recipe"] or "", where, known), source=where,
                            tokens_per_s=_positive(speed, "tokens_per_s", where) if speed else None,
                            backend=(row.get("backend") or "").strip() or None,
                            device=(row.get("device") or "").strip() or None))
    if not runs:
        raise ValueError(f"{path}: no rows below the header {', '.join(header)}")
    return runs


def write_csv(runs: Iterable[Run], path: str | Path) -> None:
    """Write ``runs`` in the CSV form :func:`read_csv` reads (recipe by name, speed columns empty where unknown),
    plus a ``source`` column."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_COLUMNS, *SPEED_COLUMNS, "source"])
        for run in runs:
            speed = "" if run.tokens_per_s is None else repr(float(run.tokens_per_s))
            writer.writerow([repr(float(run.N)), repr(float(run.D)), repr(float(run.loss)), run.recipe_name,
                             speed, run.backend or "", run.device or "", run.source])


def read_wandb(project: str, entity: str | None = None) -> list[Run]:
    """Finished runs of a wandb project (needs network access and the ``wandb`` package, imported here).

    Each run must carry the run-record keys (``params_non_embedding``, ``tokens``, ``val_loss``, ``recipe``) in
    its summary or config, e.g. by ``wandb.run.summary.update(record)`` at the end of training.
    """
    import wandb  # lazily: only this source needs it

    path = f"{entity}/{project}" if entity else project
    runs = []
    for item in wandb.Api().runs(path, filters={"state": "finished"}):
        logged = {**dict(item.config), **dict(item.summary)}
        source = f"wandb:{path}/{item.id}"
        # Only the record's fields: a wandb run's config and summary also hold wandb's own entries.
        record = RunRecord.from_dict({key: logged[key] for key in WANDB_KEYS if key in logged}, source)
        runs.append(run_from_record(record, source))
    if not runs:
        raise ValueError(f"wandb project {path!r}: no finished runs")
    return runs


def load_runs(sources: Sequence[str | Path]) -> list[Run]:
    """Runs from each source: a directory (its run.json files), a ``run.json`` or ``.csv`` file, or
    ``wandb:[entity/]project``. Raises FileNotFoundError / ValueError naming the source that failed."""
    if not sources:
        raise ValueError("no run sources given; pass run directories, run.json files, CSV files or wandb:PROJECT")
    runs: list[Run] = []
    for source in sources:
        text = str(source)
        if text.startswith("wandb:"):
            entity, _, project = text.removeprefix("wandb:").rpartition("/")
            runs += read_wandb(project, entity or None)
            continue
        path = Path(source)
        if path.is_dir():
            runs += read_run_dirs(path)
        elif path.is_file() and path.suffix == ".csv":
            runs += read_csv(path)
        elif path.is_file() and path.suffix == ".json":
            runs.append(read_run_json(path))
        elif path.exists():
            raise ValueError(f"{path}: not a run source; allowed: a directory, a run.json file, a .csv file or "
                             "wandb:[entity/]project")
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    check_recipe_names(runs)
    return runs


def check_recipe_names(runs: Sequence[Run]) -> None:
    """Raise ValueError when two different recipes share one name (the table keys recipes by name)."""
    seen: dict[str, Run] = {}
    for run in runs:
        first = seen.setdefault(run.recipe_name, run)
        if first.recipe != run.recipe:
            raise ValueError(f"recipe name {run.recipe_name!r} names two different recipes: {first.recipe.to_dict()} "
                             f"({first.source}) and {run.recipe.to_dict()} ({run.source}); give them distinct names")


SAME_LEVEL = 0.1  # values within 10 % count as one level: token budgets are rounded up to whole steps


def levels(values: Sequence[float], tolerance: float = SAME_LEVEL) -> list[list[int]]:
    """Indices of ``values`` (positive) grouped into levels, in increasing order: each level holds the sorted
    values below ``1 + tolerance`` times its smallest one (so D/N = 1.002 and 1.006 are one ratio)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and values[i] < values[groups[-1][0]] * (1.0 + tolerance):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def recipes_of(runs: Sequence[Run]) -> dict[str, Recipe]:
    """The distinct recipes of ``runs`` by name, in order of first appearance."""
    out: dict[str, Recipe] = {}
    for run in runs:
        out.setdefault(run.recipe_name, run.recipe)
    return out
