"""Fault injection: signals, kills and corrupted files (checkpoint, run.json, each export kind). Each ends in a
clear error or an exact resume; never a silent wrong number, never lost data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitlaw.deploy.evaluate import main as eval_main
from bitlaw.deploy.export import main as export_main
from bitlaw.deploy.load import load_model
from tests.deploy.checkpoints import small_checkpoint, small_tokenizer
from tests.helpers import small_overrides, train_cli, train_losses

STEPS = 40
TIMINGS = ("tokens_per_s", "throughput")  # the only fields of run.json that depend on the wall clock


def _overrides(corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    """A 40-step run that prints a plain progress line per step (output is not a terminal)."""
    base = [o for o in small_overrides(corpus, cache, run_dir) if o != "trainer.enable_progress_bar=false"]
    return [*base, f"trainer.max_steps={STEPS}", "val_every=20", "ckpt_every=8", "callbacks.progress.print_every=1"]


def _interrupt(args: list[str], cwd: Path, after_step: int, signum: int, env: dict[str, str] | None = None
               ) -> tuple[int, str]:
    """Run ``bitlaw-train *args``, send ``signum`` once it prints step ``after_step``; (exit status, stderr)."""
    with open(cwd / "stderr.txt", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "bitlaw.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=err, text=True, env=env)
        for line in process.stdout:
            if line.startswith(f"step {after_step}/"):
                process.send_signal(signum)
                break
        process.stdout.read()
        status = process.wait(timeout=600)
    return status, (cwd / "stderr.txt").read_text()


def _record(run_dir: Path) -> dict:
    record = json.loads((run_dir / "run.json").read_text())
    return {key: value for key, value in record.items() if key not in TIMINGS}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 40-step run (subprocess, like the interrupted ones) and its data cache."""
    base = tmp_path_factory.mktemp("reference")
    run_dir, cache = base / "run", base / "cache"
    done = train_cli(_overrides(corpus, cache, run_dir), base)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, cache


def test_sigterm_checkpoints_exits_143_and_the_rerun_equals_an_uninterrupted_run(reference, corpus, tmp_path):
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    args = _overrides(corpus, cache, run_dir)
    status, stderr = _interrupt(args, tmp_path, 3, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("bitlaw-train: stopped")]
    assert len(stopped) == 1 and "stopped by SIGTERM after step" in stopped[0] and "Traceback" not in stderr
    assert "run the same command to resume" in stopped[0]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 3 <= step < STEPS and f"after step {step};" in stopped[0]
    assert not (run_dir / "run.json").exists()  # `bitlaw-train && bitlaw-export` exports nothing half-trained

    again = train_cli(args, tmp_path)
    assert again.returncode == 0 and f"resuming at step {step}" in again.stdout, again.stderr[-3000:]
    assert _record(run_dir) == _record(reference_dir)  # bitwise: val_loss, settings, everything but timings
    assert train_losses(run_dir) == train_losses(reference_dir)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGUSR1, 138)])
def test_sigint_and_sigusr1_stop_the_same_way_and_slurm_requeues(reference, corpus, tmp_path, signum, status):
    _, cache = reference
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    if signum == signal.SIGUSR1:
        # A SLURM job (sbatch --signal=USR1@90): scontrol stands in for SLURM's and records its arguments.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
        (bin_dir / "scontrol").chmod(0o755)
        env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NAME="sweep",
                   SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost")
    got, stderr = _interrupt(_overrides(corpus, cache, run_dir), tmp_path, 3, signum, env)
    name = signal.Signals(signum).name
    assert got == status, stderr[-3000:]
    assert f"bitlaw-train: stopped by {name} after step" in stderr and "Traceback" not in stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "run.json").exists()
    if signum == signal.SIGUSR1:
        assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
        assert "the job was requeued and resumes there" in stderr


def test_sigkill_loses_only_the_steps_since_the_checkpoint_and_resumes_exactly(reference, corpus, tmp_path):
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    args = _overrides(corpus, cache, run_dir)
    status, _ = _interrupt(args, tmp_path, 12, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] in (8, 16)
    again = train_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _record(run_dir) == _record(reference_dir) and train_losses(run_dir) == train_losses(reference_dir)


def test_a_corrupt_checkpoint_or_run_record_is_named_and_kept(reference, corpus, tmp_path):
    _, cache = reference
    run_dir = tmp_path / "run"
    args = _overrides(corpus, cache, run_dir)
    status, _ = _interrupt(args, tmp_path, 3, signal.SIGTERM)
    assert status == 143
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk fault: half a checkpoint
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    broken = train_cli(args, tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    (line,) = broken.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"bitlaw-train: cannot read checkpoint {last}") and "resume=never" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    done = train_cli([*args, "resume=never"], tmp_path)
    assert done.returncode == 0
    record = run_dir / "run.json"
    record.write_text(record.read_text()[:100])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    broken = train_cli(args, tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith(f"bitlaw-train: {record} is not a readable run record")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.fixture(params=["native", "hf", "compressed-tensors"])
def export_dir(request, tmp_path: Path) -> Path:
    """An export of each kind, with a tokenizer, written by bitlaw-export."""
    if request.param != "native":
        pytest.importorskip("transformers")
    if request.param == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    tokenizer = small_tokenizer(tmp_path / "tokenizer.json")
    ckpt = small_checkpoint(tmp_path, "quest_w4a4", tokenizer=tokenizer)
    assert export_main([str(ckpt), "--format", request.param, "--out", str(tmp_path / "e")]) == 0
    return tmp_path / "e"


def test_every_file_of_every_export_is_verified(export_dir: Path) -> None:
    meta = json.loads((export_dir / "bitlaw.json").read_text())
    expected = {"model.safetensors", "tokenizer.json"} | (
        {"config.json", "tokenizer_config.json"} if meta["format"] != "bitlaw-native" else set())
    assert set(meta["files"]) == expected and meta["tokenizer"] == "tokenizer.json"
    loaded = load_model(export_dir)
    assert loaded.verified and loaded.tokenizer_path == export_dir / "tokenizer.json"
    for name in sorted(expected):
        path = export_dir / name
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=re.escape(f"{path} is truncated or modified: sha256")):
            load_model(export_dir)
        path.write_bytes(original[:-1])
        with pytest.raises(ValueError, match=re.escape(f"{path} is truncated or modified: {len(original) - 1} bytes")):
            load_model(export_dir)
        path.unlink()
        with pytest.raises(FileNotFoundError, match=re.escape(f"{path} is missing")):
            load_model(export_dir)
        path.write_bytes(original)
    assert load_model(export_dir).verified


def test_a_modified_export_is_one_line_and_exit_2_in_the_commands(export_dir: Path, tmp_path: Path,
                                                                  capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over a lazy dog " * 40)
    tensors = export_dir / "model.safetensors"
    flipped = bytearray(tensors.read_bytes())
    flipped[-3] ^= 0x10  # a weight byte: loaded unverified, it would give a wrong loss, silently
    tensors.write_bytes(bytes(flipped))
    assert eval_main([str(export_dir), "--text", str(text), "--seq-len", "16", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"bitlaw-eval: {tensors} is truncated or modified")
