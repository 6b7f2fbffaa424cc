"""bitlaw-info: exact counts, grouped digits, bytes per recipe, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from bitlaw.deploy.info import main

ROOT = Path(__file__).resolve().parents[2]


def test_counts_and_bytes(capsys):
    assert main(["model=30m", "quant=quest_w4a4"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding parameters N: 30,482,560" in out
    assert "total parameters: 71,442,560" in out  # + 2 · 32000 · 640
    # 30,474,240 block weights at 4 bits + one fp32 scale per output row (6 layers × (4·640 + 2·1792 + 640) rows).
    rows = 6 * (4 * 640 + 2 * 1792 + 640)
    assert f"{30_474_240 // 2 + 4 * rows:,} bytes" in out
    assert "60,948,480 bytes" in out


def test_bf16_and_one_bit(capsys):
    assert main(["model=800m", "quant=bf16"]) == 0
    assert "822,151,168" in capsys.readouterr().out
    assert main(["model=800m", "quant=quest_w1a1"]) == 0
    assert "0.063x of bf16" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["model=31m"], "Could not find 'model/31m'"),
    (["quant=quest_w5a5"], "Could not find 'quant/quest_w5a5'"),
    (["model.n_layr=3"], "Could not override 'model.n_layr'"),
    (["model=tiny", "model.d_model=200", "model.n_head=2", "quant=quest_w4a4"], "block=128 does not divide"),
])
def test_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "bitlaw.deploy.info", "model=tiny", "quant=quest_w2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipe quest_w2: weight int2" in proc.stdout and "input bf16 (not quantized)" in proc.stdout
