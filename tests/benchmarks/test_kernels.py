"""``python -m bitlaw.benchmarks.kernels`` runs end to end in both modes (timings are printed, never asserted); the
CPU reference table writes its record, the interpreter mode none, and ``render`` shows the recorded figures."""

from __future__ import annotations

import importlib

import pytest
import torch

from bitlaw.benchmarks import kernels
from bitlaw.benchmarks.record import BenchmarkRecord, read_records
from bitlaw.kernels.triton.common import INTERPRETED


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter mode of the kernel table")
def test_kernel_table_runs_under_the_interpreter(capsys, tmp_path):
    kernels.main(["--triton", "--shapes", "32x128x64", "--min-run-time", "0.01", "--recipes", "quest_w4a4",
                  "--record-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for measure in ("quantize GB/s", "gemm ms", " fp8 ", " bf16 ", "x of bf16", "of copy", "linear fwd+bwd ms",
                    "reference", "saved activations MiB"):
        assert measure in out
    # Activations kept per token: 64 nibble bytes + 16 mask bytes + a 4-byte step, vs 256 bf16 bytes.
    assert f"{(64 + 16 + 4) / 256:.3f} of nn.Linear" in out
    assert not list(tmp_path.iterdir())  # interpreted timings are numpy's: no record


def test_reference_table_runs_on_the_cpu_and_writes_its_record(capsys, tmp_path):
    kernels.main(["--cpu", "--shapes", "16x128x32", "--min-run-time", "0.01", "--recipes", "quest_w4a4", "quest_w4",
                  "--record-dir", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("16x128x32")]
    assert [row.split()[1] for row in rows] == ["quest_w4a4", "quest_w4"]
    (record,) = read_records(tmp_path)
    assert (record.benchmark, record.kind, record.module) == ("kernels-reference-cpu", "measured", kernels.__name__)
    assert record.device.endswith(f" CPU, {torch.get_num_threads()} threads")
    assert record.command == ("python -m bitlaw.benchmarks.kernels --cpu --shapes 16x128x32 --min-run-time 0.01 "
                              f"--recipes quest_w4a4 quest_w4 --record-dir {tmp_path}")
    assert [(r["m"], r["k"], r["n"], r["recipe"]) for r in record.rows] == [(16, 128, 32, "quest_w4a4"),
                                                                         (16, 128, 32, "quest_w4")]
    assert all(r["nn_linear_ms"] > 0 and r["quantized_ms"] > 0 for r in record.rows)
    text = importlib.import_module(record.module).render(record)
    for printed, row in zip(rows, record.rows, strict=True):
        ratio = f"{row['quantized_ms'] / row['nn_linear_ms']:.2f}x"
        assert printed.split()[2:] == [f"{row['nn_linear_ms']:.2f}", f"{row['quantized_ms']:.2f}", ratio]
        assert f"| 16x128x32 | {row['recipe']} | {row['nn_linear_ms']:.2f} | {row['quantized_ms']:.2f} | {ratio} |" \
            in text


def test_no_record_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    kernels.main(["--cpu", "--shapes", "16x128x32", "--min-run-time", "0.01", "--recipes", "quest_w4", "--no-record"])
    assert not list(tmp_path.iterdir()) and "record:" not in capsys.readouterr().out


def test_the_gpu_table_renders_every_recorded_figure():
    layer = {"recipe": "quest_w4a4", "check_rel_error": 1.2e-3, "linear_ms": 2.0, "nn_linear_ms": 2.5,
             "reference_ms": 10.0, "saved_bytes": 3 * 2**20, "nn_linear_saved_bytes": 12 * 2**20}
    row = {"m": 16384, "k": 2048, "n": 11264, "quantize_bytes": 3.0e6, "quantize_ms": 2e-3, "copy_bytes": 6.0e6,
           "copy_ms": 2e-3, "quantize_gb_s": 1500.0, "copy_gb_s": 3000.0, "scaled_mm_ms": 0.5, "bf16_mm_ms": 1.0,
           "layers": [layer]}
    record = BenchmarkRecord(benchmark="kernels-gpu", title="t", kind="measured", module=kernels.__name__,
                             command="python -m bitlaw.benchmarks.kernels", rows=[row],
                             notes={"operands": "bf16", "timer": "triton.testing.do_bench", "min_run_time": 1.0,
                                    "check_tolerance": kernels.CHECK_TOLERANCE})
    text = kernels.render(record)
    flops = 2.0 * 16384 * 2048 * 11264
    for cells in ("| 16384x2048x11264 |  | gemm ms | 0.5 fp8 | 1 bf16 | 0.50x of bf16 |",
                  f"| {flops / 0.5 / 1e9:.4g} TF/s | {flops / 1.0 / 1e9:.4g} TF/s |",
                  "| quest_w4a4 | quantize GB/s | 1500 | 3000 copy | 0.50 of copy |",
                  "| quest_w4a4 | check vs reference | 0.0012 | rel. norm error | ok |",
                  "| linear fwd+bwd ms | 2 | 2.5 nn.Linear | 0.80x nn.Linear |", "| 10 reference | 5.00x faster |",
                  "| saved activations MiB | 3 | 12 nn.Linear | 0.250 of nn.Linear |"):
        assert cells in text, cells
    with pytest.raises(ValueError, match="'kernels-x' is not allowed; allowed: kernels-gpu"):
        kernels.render(BenchmarkRecord("kernels-x", "t", "measured", kernels.__name__, "c", []))


def test_the_gpu_shapes_are_the_800m_blocks_gemms():
    # q/k/v as one GEMM of 3 × 2048 outputs, o, gate/up as one of 2 × 5632, down: at 16,384 tokens.
    assert kernels.GPU_SHAPES == [(16384, 2048, 6144), (16384, 2048, 2048), (16384, 2048, 11264),
                                  (16384, 5632, 2048)]


@pytest.mark.parametrize("argv", [["--shapes", "16x128"], ["--shapes", "0x128x32"], ["--cpu", "--triton"]])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        kernels.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is not allowed; allowed: MxKxN" in err or "exclude each other" in err
