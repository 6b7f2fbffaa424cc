"""A scaling sweep and its law fit as a benchmark: ``bitlaw-train -m`` into a sweep folder, then ``bitlaw-fit``.

    python -m bitlaw.benchmarks.sweep --name ID --sweep-dir DIR [--fit-dir DIR] [--title TEXT]
        [--bootstrap N] [--forms F...] [--record-dir DIR | --no-record] OVERRIDES...

for example ``python -m bitlaw.benchmarks.sweep --name sweep-cpu_mini_sweep --sweep-dir runs/cpu_mini_sweep
experiment=cpu_mini_sweep``. It runs ``bitlaw-train -m hydra.sweep.dir=DIR OVERRIDES`` (finished runs in the folder
are skipped by bitlaw-train itself, unfinished ones resumed), then ``bitlaw-fit DIR --out FIT_DIR`` (default
``fits/<name of DIR>``; ``--bootstrap`` and ``--forms`` are passed on when given), each a fresh process timed by the
wall clock. The record (id ``--name``, kind ``measured``) has one row per run in the folder — N, D, recipe, final
validation loss, tokens/s and code version from its ``run.json``, and whether this launch trained or skipped it — and
notes with both commands, their wall times, the counts of runs trained and skipped, and per law form the fit's RMSE,
capacities with 1σ intervals and number of warnings (``fit.json``). Put ``OVERRIDES`` after ``--`` when ``--forms``
precedes them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from ..core.records import RUN_RECORD_FILE, RunRecord, read_json_object
from .commands import CommandFailed, Finished, run
from .markdown import duration, table
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.sweep"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SKIPPED = re.compile(r"^bitlaw-train: skipped (.+?): already finished")
_TRAINED = re.compile(r"^final validation loss .* run record (.+)$")
# Overrides the benchmark sets itself: the sweep folder, and one run directory per run.
_RESERVED = ("hydra.sweep.dir", "run_dir")


def launched(finished: Finished, cwd: Path) -> tuple[set[Path], set[Path]]:
    """The run directories ``bitlaw-train -m`` trained and skipped, from the lines it printed, resolved against
    ``cwd``."""
    trained, skipped = set(), set()
    for line in finished.lines():
        if match := _TRAINED.match(line):
            trained.add((cwd / match.group(1)).resolve().parent)
        elif match := _SKIPPED.match(line):
            skipped.add((cwd / match.group(1)).resolve())
    return trained, skipped


def run_rows(sweep_dir: Path, trained: set[Path], skipped: set[Path]) -> list[dict[str, Any]]:
    """One row per ``run.json`` under ``sweep_dir`` (as ``bitlaw-fit`` finds them), sorted by N, D, recipe."""
    rows = []
    for path in sorted(sweep_dir.rglob(RUN_RECORD_FILE)):
        record = RunRecord.read(path)
        run_dir = path.parent.resolve()
        launch = "trained" if run_dir in trained else "skipped" if run_dir in skipped else "earlier launch"
        rows.append({"run": path.parent.relative_to(sweep_dir).as_posix(), "N": record.params_non_embedding,
                     "D": record.tokens, "recipe": record.recipe_name, "val_loss": record.val_loss,
                     "tokens_per_s": record.tokens_per_s, "code_version": record.code_version, "this_launch": launch})
    return sorted(rows, key=lambda row: (row["N"], row["D"], row["recipe"], row["run"]))


def fit_summary(fit_json: Path) -> dict[str, dict[str, Any]]:
    """Per law form of ``fit_json``: RMSE, runs, capacity per recipe with its 1σ interval (None where the fit has
    none), and the number of warnings."""
    entries = read_json_object(fit_json, "run bitlaw-fit again")
    summary = {}
    for form, entry in entries.items():
        intervals = entry.get("capacity_intervals") or {}
        summary[form] = {"rmse": entry["rmse"], "n_runs": entry.get("n_runs"), "warnings": len(entry["warnings"]),
                         "capacity": {recipe: {"value": rho, "interval": intervals.get(recipe)}
                                      for recipe, rho in entry["capacity"].items()}}
    return summary


def measure(name: str, title: str, sweep_dir: Path, fit_dir: Path, overrides: list[str],
            fit_options: list[str]) -> BenchmarkRecord:
    """Run the sweep and the fit from the working directory and return the unstamped record."""
    cwd = Path.cwd()
    sweep = run("bitlaw.train", ["-m", f"hydra.sweep.dir={sweep_dir}", *overrides], cwd)
    trained, skipped = launched(sweep, cwd)
    fit = run("bitlaw.scaling", [str(sweep_dir), "--out", str(fit_dir), *fit_options], cwd)
    rows = run_rows(sweep_dir, trained, skipped)
    notes = {"sweep_command": sweep.command, "sweep_wall_s": sweep.seconds, "trained": len(trained),
             "skipped": len(skipped), "fit_command": fit.command, "fit_wall_s": fit.seconds,
             "fit": fit_summary(fit_dir / "fit.json")}
    return BenchmarkRecord(name, title, "measured", MODULE, "", rows, notes)


def capacity_cell(capacity: dict[str, Any] | None) -> str:
    """``0.18 [0.0001, 0.86]``: ρ with its 1σ interval; ``—`` for a recipe the form did not fit."""
    if capacity is None:
        return "—"
    cell = f"{capacity['value']:.3g}"
    if capacity["interval"] is not None:
        cell += " [{:.3g}, {:.3g}]".format(*capacity["interval"])
    return cell


def render(record: BenchmarkRecord) -> str:
    """The two commands with their wall times, every run, and the fit per form."""
    notes, rows = record.notes, record.rows
    earlier = sum(row["this_launch"] == "earlier launch" for row in rows)
    lines = [
        f"`{notes['sweep_command']}` trained {notes['trained']} runs and skipped {notes['skipped']} already "
        f"finished ones in {duration(notes['sweep_wall_s'])} (wall clock); `{notes['fit_command']}` took "
        f"{duration(notes['fit_wall_s'])}."
        + (f" {earlier} of the runs in the folder come from earlier launches with other settings." if earlier else ""),
        "",
        "Every run in the sweep folder, from its `run.json` (final validation loss in nats/token):",
        "",
        table(["N", "D (tokens)", "recipe", "final loss", "tokens/s", "code version", "this launch"],
              [[f"{row['N']:,}", f"{row['D']:,}", row["recipe"], f"{row['val_loss']:.4f}",
                "—" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}", row["code_version"] or "—",
                row["this_launch"]] for row in rows], "rrlrrll"),
        "",
    ]
    fit = notes["fit"]
    recipes = list(dict.fromkeys(recipe for entry in fit.values() for recipe in entry["capacity"]))
    lines += [
        "The fit per law form (`fit.json`): RMSE on the loss (nats/token), the number of warnings it wrote, and the "
        "capacity ρ of each recipe with its bootstrap 1σ interval where the fit has one.",
        "",
        table(["form", "runs", "RMSE", "warnings", *(f"ρ {recipe}" for recipe in recipes)],
              [[form, entry["n_runs"], f"{entry['rmse']:.4f}", entry["warnings"],
                *(capacity_cell(entry["capacity"].get(recipe)) for recipe in recipes)]
               for form, entry in fit.items()], "lrrr" + "r" * len(recipes)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """0 on success; 1 when the sweep or the fit failed (its last lines on stderr); 2 for bad arguments."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the record's id and file name, e.g. sweep-cpu_mini_sweep")
    parser.add_argument("--sweep-dir", type=Path, required=True, help="the sweep folder (hydra.sweep.dir)")
    parser.add_argument("--fit-dir", type=Path, help="bitlaw-fit's --out (default: fits/<name of --sweep-dir>)")
    parser.add_argument("--title", help="the section's title (default: Sweep `OVERRIDES` and its law fit)")
    parser.add_argument("--bootstrap", type=int, help="bitlaw-fit --bootstrap (default: bitlaw-fit's own)")
    parser.add_argument("--forms", nargs="+", help="bitlaw-fit --forms (default: bitlaw-fit's own)")
    add_record_arguments(parser)
    parser.add_argument("overrides", nargs="+", help="bitlaw-train -m overrides, e.g. experiment=cpu_mini_sweep")
    args = parser.parse_args(argv)
    problem = None
    if not _NAME.fullmatch(args.name):
        problem = f"--name {args.name!r} is not allowed; allowed: letters, digits, '.', '_' and '-' (a file name)"
    reserved = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") in _RESERVED]
    if reserved:
        problem = (f"the override(s) {' '.join(reserved)} are not allowed: --sweep-dir sets the sweep folder, and "
                   "each run gets its own directory in it")
    if problem:
        print(f"{parser.prog}: {problem}", file=sys.stderr)
        return 2
    fit_dir = args.fit_dir or Path("fits") / args.sweep_dir.name
    fit_options = ([] if args.bootstrap is None else ["--bootstrap", str(args.bootstrap)]) + (
        ["--forms", *args.forms] if args.forms else [])
    title = args.title or f"Sweep `{' '.join(args.overrides)}` and its law fit"
    try:
        record = measure(args.name, title, args.sweep_dir, fit_dir, args.overrides, fit_options)
    except (CommandFailed, ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    record.command = command_line(MODULE, argv)
    path = write_record(record, record_directory(args))
    print(f"sweep: {record.notes['trained']} trained, {record.notes['skipped']} skipped, {len(record.rows)} runs "
          f"in {args.sweep_dir}; " + (f"record {path}" if path else "no record"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
