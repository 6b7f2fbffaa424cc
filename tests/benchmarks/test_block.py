"""``python -m bitlaw.benchmarks.block`` runs a tiny block per recipe on the CPU (timings printed, never asserted),
writes its record and renders it; the estimate columns come from the ``estimate-800m`` record and only at the
800M size it models."""

from __future__ import annotations

import importlib

import pytest

from bitlaw.benchmarks import block
from bitlaw.benchmarks.record import BenchmarkRecord, read_records, write_record


def test_a_tiny_block_runs_per_recipe_and_the_record_renders(tmp_path, capsys):
    block.main(["--cpu", "--no-compile", "--min-run-time", "0.01", "--quant", "bf16", "quest_w4a4",
                "--record-dir", str(tmp_path)])
    out = capsys.readouterr().out
    (record,) = read_records(tmp_path)
    assert (record.benchmark, record.kind, record.module) == ("block-cpu", "measured", block.__name__)
    assert [(row["recipe"], row["mode"]) for row in record.rows] == [("bf16", "eager"), ("quest_w4a4", "eager")]
    assert all(row["ms"] > 0 and row["error"] is None for row in record.rows), record.rows
    assert record.rows[0]["backend"] is None and record.rows[1]["backend"] == "reference"  # CPU: reference path
    assert record.rows[0]["vs_bf16"] == 1.0
    assert record.notes["tokens"] == 128 and record.notes["size"] == "tiny"
    assert all(row["estimate_us"] == [] for row in record.rows)  # the estimate models the 800M block only
    text = importlib.import_module(record.module).render(record)
    for row in record.rows:
        assert f"| {row['recipe']} | eager | {row['ms']:.3f} | {row['vs_bf16']:.2f}x |" in text
        assert f"{row['ms']:.3f}" in out


def test_the_800m_block_is_the_models_and_the_estimate_sits_beside_each_measurement(tmp_path):
    config, sequences, seq_len = block.block_config("800m")
    assert (config.d_model, config.n_head, config.hidden, config.head_dim) == (2048, 16, 5632, 128)
    assert (sequences * seq_len, seq_len) == (16_384, 512)
    rows = [{"recipe": "bf16", "scope": "block", "efficiency": e, "block_us": 10_000.0 - 1000 * i}
            for i, e in enumerate((0.8, 0.6, 0.7))]
    rows += [{"recipe": "quest_w4a4", "scope": "block", "efficiency": 0.6, "block_us": 8_000.0},
             {"recipe": "quest_w4a4", "scope": "pass", "efficiency": 0.6, "us": 1.0}]
    record = BenchmarkRecord("estimate-800m", "t", "estimated", "m", "c", rows)
    path = write_record(record, tmp_path)
    estimate = block.estimated_block_us("800m", path)
    assert estimate == {"bf16": [9_000.0, 8_000.0, 10_000.0], "quest_w4a4": [8_000.0]}  # efficiencies ascending
    assert block.estimated_block_us("tiny", path) == {}
    measured = [{"recipe": "bf16", "mode": "eager", "ms": 18.0}, {"recipe": "quest_w4a4", "mode": "eager", "ms": 12.0},
                {"recipe": "quest_w4a4_g8g8", "mode": "compiled", "ms": None}]
    out = block.with_ratios(measured, estimate)
    assert [row["vs_bf16"] for row in out] == [1.0, pytest.approx(12 / 18), None]
    assert out[0]["measured_over_estimate"] == [2.0, 2.25, 1.8] and out[1]["measured_over_estimate"] == [1.5]
    assert out[2]["estimate_us"] == [] and out[2]["measured_over_estimate"] == []
    assert block.cells({**out[0], "backend": None})[5:] == ("9.00 / 8.00 / 10.00", "2.00 / 2.25 / 1.80")


def test_the_committed_estimate_covers_the_benchmarks_recipes():
    estimate = block.estimated_block_us("800m")
    assert set(block.RECIPES) <= set(estimate) and all(len(times) == 3 for times in estimate.values())
