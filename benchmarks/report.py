"""``python -m bitlaw.benchmarks.report``: write BENCHMARKS.md from the benchmark records, and check it.

    python -m bitlaw.benchmarks.report [--records DIR] [--out BENCHMARKS.md] [--check]

Every record in ``--records`` (default ``benchmarks/records``, :mod:`bitlaw.benchmarks.record`) becomes one section
``## <title>``: a provenance line (the command in backticks, the device, the date, the commit, the library versions)
and the Markdown its module's ``render(record)`` returns. Sections are grouped by kind — measured, compiled, estimated,
in that order — and sorted by benchmark id within a group, so the same records always give the same file. ``--check``
writes nothing: it exits 1, showing the difference, when the file on disk is not what the records give. A records
folder that does not exist or holds a file that is not a well-formed record exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import textwrap
from pathlib import Path

from ..core.records import read_json_object
from .record import KINDS, RECORDS_DIR, BenchmarkRecord

PROG = "python -m bitlaw.benchmarks.report"
PACKAGE = "bitlaw.benchmarks"
ARCHIVE = "benchmarks/ARCHIVE.md"
GROUPS = {"measured": "Measured", "compiled": "Compiled (static profile, not run)", "estimated": "Estimated"}
MEANINGS = {  # the kinds as bitlaw.benchmarks.record defines them
    "measured": "run on the named device, and timed or evaluated there",
    "compiled": "read from compiled code without running it",
    "estimated": "computed from a model, not run",
}
_DIFF_LINES = 40  # of the difference --check shows
_WIDTH = 120  # of the header's paragraphs, as the project's hand-written Markdown (a provenance line is one line)


def _paragraph(text: str) -> str:
    """``text`` wrapped at :data:`_WIDTH` columns, words (and paths, and code spans' words) never split."""
    return textwrap.fill(text, _WIDTH, break_long_words=False, break_on_hyphens=False)


def section(record: BenchmarkRecord) -> str:
    """The Markdown section of ``record``: its heading, its provenance line and its module's ``render(record)``.
    ValueError naming the record when its module is not a benchmark module with a ``render``, or when ``render``
    cannot read the record."""
    where = f"record {record.benchmark!r}"
    if record.module != PACKAGE and not record.module.startswith(PACKAGE + "."):
        raise ValueError(f"{where}: module {record.module!r} is not allowed; allowed: a module of {PACKAGE}")
    try:
        module = importlib.import_module(record.module)
    except ImportError as err:
        raise ValueError(f"{where}: module {record.module!r} cannot be imported ({err})") from None
    render = getattr(module, "render", None)
    if not callable(render):
        raise ValueError(f"{where}: module {record.module!r} has no render(record) function")
    try:
        body = render(record)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where} does not fit {record.module}.render: {type(err).__name__}: {err}") from None
    if not isinstance(body, str):
        raise ValueError(f"{where}: {record.module}.render returned a {type(body).__name__}, not Markdown text")
    versions = ", ".join(f"{name} {version}" for name, version in record.versions.items())
    provenance = f"`{record.command}` — {record.device}; {record.date}; commit {record.commit}; {versions}."
    return f"## {record.title}\n\n{provenance}\n\n{body.strip()}\n"


def check_record(record: BenchmarkRecord, source: Path) -> None:
    """ValueError naming ``source`` when the record lacks what a reader needs to trust its figures (command, device,
    date, commit, versions), holds fields of the wrong type, or is filed under another name than its id."""
    where = f"{source}: benchmark record"
    if record.schema_version != BenchmarkRecord.VERSION:
        raise ValueError(f"{where} has schema_version {record.schema_version!r}; this report reads "
                         f"{BenchmarkRecord.VERSION}")
    if source.stem != record.benchmark:
        raise ValueError(f"{where} {record.benchmark!r} is filed as {source.name}; a record's file is "
                         f"<benchmark>.json ({record.benchmark}.json)")
    empty = [name for name in ("title", "module", "command", "device", "date", "commit")
             if not isinstance(getattr(record, name), str) or not getattr(record, name).strip()]
    if empty:
        raise ValueError(f"{where} has no {', '.join(empty)}: write records with bitlaw.benchmarks.record."
                         "write_record, which stamps the provenance")
    if not (isinstance(record.versions, dict) and record.versions
            and all(isinstance(v, str) for v in record.versions.values())):
        raise ValueError(f"{where}: versions={record.versions!r} is not a non-empty object of library → version")
    if not (isinstance(record.rows, list) and all(isinstance(row, dict) for row in record.rows)):
        raise ValueError(f"{where}: rows is not a list of objects (one per table row)")
    if not isinstance(record.notes, dict):
        raise ValueError(f"{where}: notes={record.notes!r} is not an object")


def load(directory: Path) -> list[BenchmarkRecord]:
    """Every record (``*.json``) in ``directory``, sorted by file name and checked (:func:`check_record`);
    ValueError naming the folder or the file that is not a well-formed record."""
    if not directory.is_dir():
        raise ValueError(f"--records {directory}: no such folder (the benchmark commands write their records to "
                         f"{RECORDS_DIR} under the repository root)")
    records = []
    for path in sorted(directory.glob("*.json")):
        data = read_json_object(path, "a benchmark record is the JSON object its command wrote; run it again")
        record = BenchmarkRecord.from_dict(data, str(path))
        check_record(record, path)
        records.append(record)
    return records


def generate(records: list[BenchmarkRecord], records_label: str) -> str:
    """The text of BENCHMARKS.md from ``records``; ``records_label`` names their folder as the file should
    (relative to it)."""
    lines = [
        "# Benchmarks",
        "",
        _paragraph(f"Generated by `{PROG}` from the JSON records in `{records_label}`: do not edit this file by hand. "
                   "Every benchmark command writes its record there; rerun this command to update the file (the test "
                   "suite checks that it matches the records). Each section names the command that produced its "
                   "figures, the device, the date (UTC), the commit of the code that ran (`+dirty`: with uncommitted "
                   "changes) and the library versions."),
        "",
        *[f"- **{GROUPS[kind]}**: {MEANINGS[kind]}." for kind in KINDS],
        "",
        _paragraph(f"The hand-kept benchmark notebook this file replaces, with figures superseded since, is kept as "
                   f"history in `{ARCHIVE}`."),
        "",
    ]
    if not records:
        lines += [_paragraph(f"No benchmark records yet: `{records_label}` holds none, so this file reports no "
                             "figures."), ""]
        return "\n".join(lines)
    for kind in KINDS:
        chosen = sorted((r for r in records if r.kind == kind), key=lambda r: r.benchmark)
        if chosen:
            lines += [f"# {GROUPS[kind]}", ""]
            lines += [section(record) for record in chosen]
    return "\n".join(lines)


def records_label(records: Path, out: Path) -> str:
    """``records`` as the generated file names it: relative to the file's folder, with ``/``, ending in ``/``."""
    relative = os.path.relpath(records.resolve(), out.resolve().parent)
    return Path(relative).as_posix().rstrip("/") + "/"


def difference(on_disk: str, generated: str, out: Path) -> str:
    """The first lines of a unified diff from the file on disk to what the records give."""
    diff = list(difflib.unified_diff(on_disk.splitlines(), generated.splitlines(), f"{out} (on disk)",
                                     f"{out} (from the records)", lineterm=""))
    shown = diff[:_DIFF_LINES]
    if len(diff) > _DIFF_LINES:
        shown.append(f"… {len(diff) - _DIFF_LINES} more diff lines")
    return "\n".join(shown)


def main(argv: list[str] | None = None) -> int:
    """0 on success; 1 when ``--check`` finds the file out of date (or missing); 2 for a bad records folder or
    record (one line on stderr)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, default=RECORDS_DIR,
                        help=f"folder of benchmark records (default: {RECORDS_DIR})")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="file to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when --out differs from what the records give")
    args = parser.parse_args(argv)
    try:
        records = load(args.records)
        text = generate(records, records_label(args.records, args.out))
    except ValueError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    counted = f"{len(records)} record{'' if len(records) == 1 else 's'} in {args.records}"
    if args.check:
        if not args.out.is_file():
            print(f"{PROG}: {args.out} does not exist; write it with {PROG} --out {args.out}", file=sys.stderr)
            return 1
        on_disk = args.out.read_text(encoding="utf-8")
        if on_disk != text:
            print(f"{PROG}: {args.out} differs from what the {counted} give (edited by hand, or a record changed "
                  f"since it was generated); rewrite it with {PROG}:\n"
                  f"{difference(on_disk, text, args.out)}", file=sys.stderr)
            return 1
        print(f"{args.out} matches the {counted}")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} from the {counted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
