"""``python -m bitlaw.kernels.bench`` runs end to end in both modes (timings are printed, never asserted)."""

from __future__ import annotations

import pytest

from bitlaw.kernels import bench
from bitlaw.kernels.triton.common import INTERPRETED


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter mode of the kernel table")
def test_kernel_table_runs_under_the_interpreter(capsys):
    bench.main(["--triton", "--shapes", "32x128x64", "--min-run-time", "0.01", "--recipes", "quest_w4a4"])
    out = capsys.readouterr().out
    for measure in ("quantize GB/s", "gemm ms", "linear fwd+bwd ms", "reference", "saved activations MiB"):
        assert measure in out
    # Activations kept per token: 64 nibble bytes + 16 mask bytes + a 4-byte step, vs 256 bf16 bytes.
    assert f"{(64 + 16 + 4) / 256:.3f} of nn.Linear" in out


def test_reference_table_runs_on_the_cpu(capsys):
    bench.main(["--cpu", "--shapes", "16x128x32", "--min-run-time", "0.01", "--recipes", "quest_w4a4", "quest_w4"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("16x128x32")]
    assert [row.split()[1] for row in rows] == ["quest_w4a4", "quest_w4"]


@pytest.mark.parametrize("argv", [["--shapes", "16x128"], ["--shapes", "0x128x32"], ["--cpu", "--triton"]])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is not allowed; allowed: MxKxN" in err or "exclude each other" in err
