"""``python -m bitlaw.benchmarks.report``: BENCHMARKS.md generated from benchmark records, grouped by kind in a fixed
order with a provenance line per section; ``--check`` catches hand edits and changed records; bad input exits 2; and
the committed BENCHMARKS.md is exactly what the committed records give."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from bitlaw.benchmarks import report
from bitlaw.benchmarks.record import BenchmarkRecord, write_record

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = "bitlaw.benchmarks.synthetic_for_tests"


def _render(record: BenchmarkRecord) -> str:
    return "\n".join(f"- {row['name']}: {row['value'] * 2:.3f}" for row in record.rows)


@pytest.fixture(autouse=True)
def synthetic_module(monkeypatch):
    """A benchmark module whose render doubles each row's value, so a test sees the figure was computed."""
    module = types.ModuleType(SYNTHETIC)
    module.render = _render
    monkeypatch.setitem(sys.modules, SYNTHETIC, module)


def record(benchmark: str, kind: str, title: str, value: float = 1.5, **fields) -> BenchmarkRecord:
    """A record with every provenance field set, so writing it stamps nothing from this machine."""
    values = {"module": SYNTHETIC, "command": f"python -m {SYNTHETIC} --id {benchmark}",
              "rows": [{"name": benchmark, "value": value}], "date": "2026-01-02", "commit": "abc1234",
              "device": "test device", "versions": {"python": "3.11.0", "torch": "2.0"}, **fields}
    return BenchmarkRecord(benchmark, title, kind, **values)


def generate(records_dir: Path, out: Path, *extra: str) -> int:
    return report.main(["--records", str(records_dir), "--out", str(out), *extra])


def test_sections_are_grouped_by_kind_in_a_fixed_order_with_provenance(tmp_path):
    records_dir = tmp_path / "records"
    for rec in (record("zeta", "measured", "Zeta timing"), record("alpha", "estimated", "Alpha model"),
                record("beta", "measured", "Beta timing", value=2.25), record("gamma", "compiled", "Gamma profile")):
        write_record(rec, records_dir)
    assert generate(records_dir, tmp_path / "BENCHMARKS.md") == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    order = ["# Measured", "## Beta timing", "## Zeta timing", "# Compiled (static profile, not run)",
             "## Gamma profile", "# Estimated", "## Alpha model"]
    positions = [text.index(f"\n{heading}\n") for heading in order]
    assert positions == sorted(positions)
    assert ("## Beta timing\n\n`python -m bitlaw.benchmarks.synthetic_for_tests --id beta` — test device; 2026-01-02; "
            "commit abc1234; python 3.11.0, torch 2.0.\n\n- beta: 4.500\n") in text
    assert "`records/`" in text and "benchmarks/ARCHIVE.md" in text
    assert "No benchmark records yet" not in text
    # The same records give the same file, whatever order the files were written in.
    again = tmp_path / "again"
    for path in sorted(records_dir.glob("*.json"), reverse=True):
        again.mkdir(exist_ok=True)
        (again / path.name).write_text(path.read_text())
    assert generate(again, tmp_path / "again.md") == 0
    assert (tmp_path / "again.md").read_text() == text.replace("`records/`", "`again/`")


def test_a_kind_without_records_gets_no_heading(tmp_path):
    write_record(record("only", "measured", "Only one"), tmp_path / "records")
    assert generate(tmp_path / "records", tmp_path / "out.md") == 0
    text = (tmp_path / "out.md").read_text()
    assert "\n# Measured\n" in text and "\n# Compiled" not in text and "\n# Estimated\n" not in text


def test_an_empty_folder_says_so(tmp_path):
    (tmp_path / "records").mkdir()
    assert generate(tmp_path / "records", tmp_path / "out.md") == 0
    text = (tmp_path / "out.md").read_text()
    assert "No benchmark records yet: `records/` holds none" in text
    assert "\n## " not in text and "\n# Measured" not in text


def test_check_fails_on_a_hand_edit_and_on_a_changed_record(tmp_path, capsys):
    records_dir, out = tmp_path / "records", tmp_path / "BENCHMARKS.md"
    write_record(record("timing", "measured", "Timing"), records_dir)
    assert generate(records_dir, out, "--check") == 1  # not written yet
    assert "does not exist" in capsys.readouterr().err
    assert generate(records_dir, out) == 0
    assert generate(records_dir, out, "--check") == 0
    capsys.readouterr()

    generated = out.read_text()
    out.write_text(generated.replace("- timing: 3.000", "- timing: 2.000"))
    assert generate(records_dir, out, "--check") == 1
    err = capsys.readouterr().err
    assert "differs from what the 1 record in" in err and "-- timing: 2.000" in err and "+- timing: 3.000" in err

    out.write_text(generated)
    write_record(record("timing", "measured", "Timing", value=4.0), records_dir)
    assert generate(records_dir, out, "--check") == 1
    err = capsys.readouterr().err
    assert "-- timing: 3.000" in err and "+- timing: 8.000" in err
    assert out.read_text() == generated  # --check writes nothing


def _bad_json(directory: Path) -> str:
    (directory / "broken.json").write_text("{\"benchmark\": ")
    return "broken.json"


def _write_raw(directory: Path, name: str, **changes) -> str:
    data = json.loads(record(name, "measured", "Raw").to_json())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    (directory / f"{name}.json").write_text(json.dumps(data))
    return name


@pytest.mark.parametrize("make, named", [
    (_bad_json, "broken.json"),
    (lambda d: _write_raw(d, "nokind", kind=None), "lacks kind"),
    (lambda d: _write_raw(d, "oddkind", kind="guessed"), "kind='guessed' is not allowed"),
    (lambda d: _write_raw(d, "extra", speed="fast"), "unknown fields speed"),
    (lambda d: _write_raw(d, "outside", module="json"), "module 'json' is not allowed"),
    (lambda d: _write_raw(d, "missing", module="bitlaw.benchmarks.no_such_module"), "cannot be imported"),
    (lambda d: _write_raw(d, "norender", module="bitlaw.benchmarks.record"), "has no render(record)"),
    (lambda d: _write_raw(d, "rows", rows=[{"value": 1.0}]), "does not fit"),
    (lambda d: _write_raw(d, "nocommit", commit=""), "has no commit"),
    (lambda d: _write_raw(d, "renamed", benchmark="other"), "is filed as renamed.json"),
])
def test_a_bad_record_exits_2_with_one_line_naming_it(tmp_path, capsys, make, named):
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    write_record(record("good", "measured", "Good"), records_dir)
    make(records_dir)
    assert generate(records_dir, tmp_path / "out.md") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
    assert not (tmp_path / "out.md").exists()


def test_a_missing_records_folder_exits_2(tmp_path, capsys):
    assert generate(tmp_path / "nowhere", tmp_path / "out.md", "--check") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere: no such folder" in err


def test_the_committed_benchmarks_md_is_what_the_committed_records_give(capsys):
    """BENCHMARKS.md holds no figure that is not in a record: regenerate it with python -m bitlaw.benchmarks.report
    after a benchmark command writes its record."""
    status = generate(ROOT / "benchmarks" / "records", ROOT / "BENCHMARKS.md", "--check")
    assert status == 0, capsys.readouterr().err
