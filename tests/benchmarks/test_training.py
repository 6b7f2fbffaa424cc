"""``python -m bitlaw.benchmarks.training``: each recipe trains a few steps, tokens/s comes from its run record, and
the record ``training-cpu`` holds and renders the figures."""

from __future__ import annotations

import importlib

import pytest
import torch

from bitlaw.benchmarks import training
from bitlaw.benchmarks.record import read_records
from tests.helpers import small_overrides

# The bench sets these itself (steps, run directory, validation and checkpoint cadence).
_OWN = ("quant=", "run_dir=", "trainer.max_steps=", "tokens=", "val_every=", "val_batches=", "ckpt_every=")


def test_two_recipes_train_and_the_record_renders_their_figures(corpus, tmp_path, capsys):
    overrides = [o for o in small_overrides(corpus, tmp_path / "cache", tmp_path / "unused") if not o.startswith(_OWN)]
    training.main(["--steps", "2", "--quant", "bf16", "quest_w4a4", "--record-dir", str(tmp_path / "records"),
                   *overrides])
    out = capsys.readouterr().out
    (record,) = read_records(tmp_path / "records")
    assert (record.benchmark, record.kind, record.module) == ("training-cpu", "measured", training.__name__)
    assert record.device.endswith(f" CPU, {torch.get_num_threads()} threads")
    assert [row["recipe"] for row in record.rows] == ["bf16", "quest_w4a4"]
    assert all(row["tokens_per_s"] > 0 and row["val_loss"] > 0 for row in record.rows)
    assert record.rows[0]["backend"] is None and record.rows[1]["backend"] == "reference"  # CPU: reference path
    assert (record.notes["steps"], record.notes["global_batch"], record.notes["seq_len"]) == (2, 8, 32)
    assert record.notes["overrides"] == overrides
    text = importlib.import_module(record.module).render(record)
    base = record.rows[0]["tokens_per_s"]
    for row in record.rows:
        speed, ratio = f"{row['tokens_per_s']:.0f}", f"{row['tokens_per_s'] / base:.2f}x"
        assert f"| {row['recipe']} | {speed} | {ratio} |" in text
        assert any(line.split() == [row["recipe"], speed, ratio] for line in out.splitlines())
    assert "2 steps of 8 × 32 tokens per recipe" in text


def test_an_override_given_after_quant_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        training.main(["--quant", "bf16", "model=30m"])
    assert exc.value.code == 2
    assert "model=30m is not a quant preset but a Hydra override" in capsys.readouterr().err
