"""The command-line options every benchmark command shares: where its JSON record goes (``benchmarks.record``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .record import RECORDS_DIR


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """``--record-dir DIR`` (default ``benchmarks/records`` under the working directory) and ``--no-record``."""
    parser.add_argument("--record-dir", type=Path, default=RECORDS_DIR,
                        help=f"folder for the JSON record BENCHMARKS.md is generated from (default: {RECORDS_DIR})")
    parser.add_argument("--no-record", action="store_true", help="write no record")


def record_directory(args: argparse.Namespace) -> Path | None:
    """The folder to write the record to, or None under ``--no-record`` (``write_record`` then writes nothing)."""
    return None if args.no_record else args.record_dir
