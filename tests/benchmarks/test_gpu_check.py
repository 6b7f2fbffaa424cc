"""``tools/gpu-check.sh --dry-run`` prints the plan of the GPU check (every step, its command and time limit) on a
machine without a GPU, runs nothing, and the limits fit the 8 minutes the check is meant to take."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu-check.sh"


def test_the_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(out)})
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^step (\S+): limit (\d+) s: (.+)$", done.stdout, flags=re.MULTILINE)
    assert [name for name, _, _ in steps] == ["bench", "block", "train_30m", "train_800m", "pytest_gpu"]
    commands = {name: command for name, _, command in steps}
    assert commands["bench"].startswith("python3 -m bitlaw.benchmarks.kernels ")
    assert commands["block"].startswith("python3 -m bitlaw.benchmarks.block ")
    assert "--quant bf16 quest_w4a4 quest_w4a4_g8g8" in commands["block"]
    assert "model=30m" in commands["train_30m"] and "model=800m" in commands["train_800m"]
    assert commands["pytest_gpu"].startswith("python3 -m pytest -m gpu ")
    # Every benchmark writes its record under $OUT; the two training runs into folders of their own.
    for name in ("bench", "block", "train_30m"):
        assert f"--record-dir {out}/records" in commands[name]
    assert f"--record-dir {out}/records-800m" in commands["train_800m"]
    total = sum(int(limit) for _, limit, _ in steps)
    assert total <= 8 * 60 and f"total limit: {total} s" in done.stdout
    assert not out.exists()  # nothing ran, nothing was written


def test_an_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: tools/gpu-check.sh [--dry-run]" in done.stderr
