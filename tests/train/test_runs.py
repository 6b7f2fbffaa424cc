"""What a run is and what it leaves behind: its defining settings are compared on resume and skip, its records say
what ran (config.yaml, run.json, metrics.csv, Hydra's per-attempt records), files follow the umask, bad machine
settings fail before anything is written, and the console shows one progress display without stray warnings."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from bitlaw.train.cli import train
from bitlaw.train.config import run_dir_suffix
from bitlaw.train.plan import UsageError
from tests.helpers import compose_train, small_overrides, train_cli


def test_changed_settings_are_refused_on_resume_and_on_a_finished_run(tmp_path, corpus):
    run_dir = tmp_path / "run"
    base = small_overrides(corpus, tmp_path / "cache", run_dir)
    record = train(compose_train(base))
    assert record.settings["optim.lr"] == 0.003 == record.lr and record.settings["steps"] == 12
    assert record.settings["model.vocab_size"] == record.model["vocab_size"]
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    # Finished: a learning-rate sweep aimed at one directory must not get the first run's result back.
    with pytest.raises(UsageError, match=r"run.json was written with other settings than this run "
                                         r"\(optim.lr: 0.003 → 0.01\); run with the original settings, pick "
                                         r"another run directory \(hydra.run.dir=...\), or resume=never"):
        train(compose_train([*base, "optim.lr=1e-2"]))
    # Unfinished (the record gone, the checkpoint left): the checkpoint's settings are compared instead.
    (run_dir / "run.json").unlink()
    with pytest.raises(UsageError, match=r"checkpoint .*last.ckpt was written with other settings than this run "
                                         r"\(optim.lr: 0.003 → 0.01; optim.warmup_fraction: 0.1 → 0.2\)"):
        train(compose_train([*base, "optim.lr=1e-2", "optim.warmup_fraction=0.2"]))
    with pytest.raises(UsageError, match=r"\(steps: 12 → 20\)"):
        train(compose_train([*base, "trainer.max_steps=-1", "tokens=5120"]))
    with pytest.raises(UsageError, match=r"\(val_batches: 2 → 3\)"):
        train(compose_train([*base, "val_batches=3"]))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == {
        p: b for p, b in kept.items() if p.name != "run.json"}
    # Settings that do not change the result may differ between attempts.
    again = train(compose_train([*base, "ckpt_every=6", "val_every=4", "trainer.log_every_n_steps=3"]))
    assert again.val_loss == record.val_loss and again.settings == record.settings


def test_records_hold_what_ran_one_metrics_row_per_step_and_follow_the_umask(tmp_path, corpus, monkeypatch):
    run_dir = tmp_path / "run"
    base = small_overrides(corpus, tmp_path / "cache", run_dir, "quest_w4a4")
    previous = os.umask(0o027)
    try:
        record = train(compose_train([*base, "trainer.max_steps=9"]))
        # A restart of a finished run with resume=never replaces its metrics instead of appending a second run.
        train(compose_train([*base, "trainer.max_steps=9", "resume=never"]))
    finally:
        os.umask(previous)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["vocab_size"] == record.model["vocab_size"] != 32000
    for path in (run_dir / "run.json", run_dir / "metrics.csv", run_dir / "config.yaml",
                 run_dir / "checkpoints" / "last.ckpt"):
        assert path.stat().st_mode & 0o777 == 0o640, path
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert Counter(int(row["step"]) for row in rows) == Counter(range(10))  # 9: the final validation
    measured = {int(row["step"]) for row in rows if row["mask/layers.0.mlp.down_proj.weight"]}
    assert measured == {2, 5, 8}  # mask_stats_every=3: only the steps it measured, never repeated values


def test_default_run_directory_names_the_overrides_and_hydra_keeps_each_attempt(tmp_path, corpus):
    assert run_dir_suffix("") == ""
    assert run_dir_suffix("data.paths=[/a/b.jsonl],optim.lr=0.01") == "--data.paths=[_a_b.jsonl],optim.lr=0.01"
    long = run_dir_suffix("optim.lr=0.01," * 40)
    assert len(long) == 122 and long != run_dir_suffix("optim.lr=0.02," * 40)

    overrides = [o for o in small_overrides(corpus, tmp_path / "cache", tmp_path / "unused")
                 if not o.startswith("run_dir=")]
    first = train_cli([*overrides, "optim.lr=0.004"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("tiny-bf16-seed0--") and (run_dir / "run.json").is_file()
    other = train_cli([*overrides, "optim.lr=0.005"], tmp_path)
    assert other.returncode == 0 and len(list((tmp_path / "runs").iterdir())) == 2  # no shared directory

    def hydra_records() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in (run_dir / ".hydra").rglob("*") if p.is_file()}

    attempts = hydra_records()
    assert len({p.parent for p in attempts}) == 1
    assert "optim.lr=0.004" in (next(iter(attempts)).parent / "overrides.yaml").read_text()
    # A failing command aimed at the directory writes nothing there and changes nothing.
    failed = train_cli([*overrides, "optim.lr=0.004", f"hydra.run.dir='{run_dir}'", "seq_len=100000"], tmp_path)
    assert failed.returncode == 2 and hydra_records() == attempts
    # A later attempt (here: skipped as finished) gets its own record beside the first one.
    skipped = train_cli([*overrides, "optim.lr=0.004"], tmp_path)
    assert skipped.returncode == 0 and "already finished" in skipped.stdout
    later = hydra_records()
    assert len({p.parent for p in later}) == 2 and all(later[p] == b for p, b in attempts.items())


@pytest.mark.parametrize(("override", "message"), [
    ("trainer=gpu", r"trainer.accelerator='gpu' needs a CUDA GPU and this machine has none; allowed here: "
                    r"trainer=cpu"),
    ("backend=triton", r"backend='triton' runs the Triton kernels, which need a CUDA GPU \(trainer=gpu\), or "
                       r"TRITON_INTERPRET=1 .*; allowed here: backend=auto or reference"),
    ("run_dir={tmp}/file.txt/run", r"cannot create the directory .*/file.txt/run: .*/file.txt is a file; choose "
                                   r"another run directory"),
    ("run_dir=/proc/bitlaw-run", r"cannot write the directory /proc/bitlaw-run: /proc refuses new files"),
])
def test_settings_this_machine_cannot_run_fail_before_anything_is_written(tmp_path, corpus, monkeypatch, override,
                                                                          message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same refusal on a machine with a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "file.txt").write_text("a user's file\n")
    base = small_overrides(corpus, tmp_path / "cache", tmp_path / "run")
    with pytest.raises(UsageError, match=message):
        train(compose_train([*base, override.format(tmp=tmp_path)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert (tmp_path / "file.txt").read_text() == "a user's file\n"


def test_one_progress_bar_on_a_terminal_and_no_warnings_about_bitlaw_usage(tmp_path, corpus):
    """On a terminal: a tqdm bar in optimizer steps (not Lightning's "Epoch 0/-2"); nothing on stderr but the
    data preparation's progress and Lightning's device lines."""
    base = [o for o in small_overrides(corpus, tmp_path / "cache", tmp_path / "run")
            if o != "trainer.enable_progress_bar=false"]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    with open(tmp_path / "stderr.txt", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "bitlaw.train", *base], cwd=tmp_path, stdout=secondary,
                                   stderr=err)
        os.close(secondary)
        shown = b""
        while True:  # read while it runs (a full terminal buffer would block it); EIO once it has exited
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        os.close(primary)
        done = process.wait(timeout=600)
    text = shown.decode(errors="replace")
    stderr = (tmp_path / "stderr.txt").read_text()
    assert done == 0, stderr[-3000:]
    assert re.search(r"training: 100%\|[^|]*\| 12/12 ", text) and "Epoch" not in text, text[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    stray = [line for line in lines if not (line.startswith(("tokenizing", "preparing", "GPU available",
                                                               "TPU available")))]
    assert stray == [], stray
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps"] == 12
