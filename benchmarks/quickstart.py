"""The README's quick start as a benchmark: ``bitlaw-train`` with no arguments in a fresh, empty working directory.

    python -m bitlaw.benchmarks.quickstart [--workdir DIR] [--record-dir DIR | --no-record] [OVERRIDES...]

Runs the command as a user does (a new process, the embedded corpus tokenized from scratch since the directory is
empty) and records (record id ``quickstart``, kind ``measured``) the wall-clock seconds of the whole command and,
from the run record it wrote (``run.json``), the final validation loss, the corpus' unigram entropy, tokens, steps
and tokens/s, with the summary line the command printed. ``OVERRIDES`` are Hydra overrides appended to the command
(for tests: a smaller model; the README's figure is the command without any). ``--workdir`` must be empty or absent
(default: a temporary folder, deleted afterwards).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..core.records import RunRecord
from .commands import CommandFailed, Finished, run
from .markdown import duration, number, table
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.quickstart"
BENCHMARK = "quickstart"
TITLE = "Quick start: the default `bitlaw-train` in a fresh directory"
SUMMARY_START = "final validation loss "


def summary_line(finished: Finished) -> str:
    """The line ``bitlaw-train`` ends a finished run with (``final validation loss … run record <path>``);
    ValueError naming the command when it printed none."""
    found = [line for line in finished.lines() if line.startswith(SUMMARY_START) and " run record " in line]
    if not found:
        raise ValueError(f"`{finished.command}` printed no line starting {SUMMARY_START!r} (a run it skipped as "
                         "finished prints none: the working directory was not fresh)")
    return found[-1]


def measure(workdir: Path, overrides: list[str]) -> BenchmarkRecord:
    """Run ``bitlaw-train <overrides>`` in ``workdir`` (empty) and return the unstamped record."""
    finished = run("bitlaw.train", overrides, workdir)
    line = summary_line(finished)
    run_json = workdir / line.rpartition(" run record ")[2].strip()
    record = RunRecord.read(run_json)
    row = {"wall_s": finished.seconds, "steps": record.steps, "tokens": record.tokens,
           "tokens_per_s": record.tokens_per_s, "val_loss": record.val_loss,
           "unigram_entropy_nats": record.unigram_entropy_nats}
    notes = {"train_command": finished.command, "overrides": overrides, "summary_line": line,
             "tokens_per_s_source": record.throughput.source if record.throughput else None,
             "val_windows": record.val_windows, "code_version": record.code_version}
    return BenchmarkRecord(BENCHMARK, TITLE, "measured", MODULE, "", [row], notes)


def render(record: BenchmarkRecord) -> str:
    """The wall time and the run's figures as a one-row table, the command's summary line below it."""
    row, notes = record.rows[0], record.notes
    overrides = notes["overrides"]
    what = ("with no arguments, as in the README" if not overrides
            else f"with the overrides `{' '.join(overrides)}` (not the README's command)")
    lines = [
        f"`{notes['train_command']}` {what}, started in an empty working directory; the wall time is the whole "
        f"command's, from its start to its exit. The other figures are from the `run.json` it wrote.",
        "",
        table(["wall time", "steps", "tokens", "tokens/s", "validation loss", "unigram entropy"],
              [[duration(row["wall_s"]), f"{row['steps']:,}", f"{row['tokens']:,}",
                "—" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}", number(row["val_loss"]),
                number(row["unigram_entropy_nats"])]], "rrrrrr"),
        "",
        "Validation loss and unigram entropy in nats/token; tokens/s from the "
        f"{notes['tokens_per_s_source'] or 'run record'}. The command ended with:",
        "",
        "```",
        notes["summary_line"],
        "```",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """0 on success; 1 when ``bitlaw-train`` failed (its last lines on stderr); 2 for a working directory that is
    not empty."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        help="an empty or absent folder to run in (default: a temporary folder, deleted afterwards)")
    add_record_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides appended to bitlaw-train (default: none)")
    args = parser.parse_args(argv)
    if args.workdir is not None and args.workdir.exists() and (
            not args.workdir.is_dir() or any(args.workdir.iterdir())):
        print(f"{parser.prog}: --workdir {args.workdir} is not an empty folder; the quick start runs in a fresh one "
              "(allowed: an empty or absent folder)", file=sys.stderr)
        return 2
    try:
        if args.workdir is None:
            with tempfile.TemporaryDirectory(prefix="bitlaw-quickstart-") as tmp:
                record = measure(Path(tmp), args.overrides)
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)
            record = measure(args.workdir, args.overrides)
    except (CommandFailed, ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    record.command = command_line(MODULE, argv)
    path = write_record(record, record_directory(args))
    print(f"quick start: {duration(record.rows[0]['wall_s'])} wall; " + (f"record {path}" if path else "no record"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
