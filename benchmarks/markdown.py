"""Markdown pieces the benchmarks' ``render(record)`` functions share: tables and the formats of figures."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one letter per column, ``l`` or ``r`` (missing letters: ``l``)."""
    marks = ["---:" if (align[i:i + 1] or "l") == "r" else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``2 min 30 s`` from 150.2; ``24.9 s`` under a minute; ``1 h 02 min`` from an hour on."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def number(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals, ``—`` for None (a figure the record does not have)."""
    return "—" if value is None else f"{value:.{digits}f}"
