"""Re-launching a run (or a whole sweep) skips run directories that already hold a finished run.json."""

from __future__ import annotations

import json
import shutil

import pytest

from bitlaw.train.cli import train
from bitlaw.train.module import LitLlama
from tests.helpers import compose_train, small_overrides


def test_finished_run_is_skipped_mismatch_is_refused_and_resume_never_retrains(tmp_path, corpus, monkeypatch,
                                                                               capsys):
    run_dir = tmp_path / "run"
    base = small_overrides(corpus, tmp_path / "cache", run_dir)
    first = train(compose_train(base))
    written = {name: (run_dir / name).read_bytes() for name in ("run.json", "metrics.csv", "checkpoints/last.ckpt")}

    steps = []
    original = LitLlama.training_step

    def counting(self, batch, batch_idx):
        steps.append(self.global_step)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LitLlama, "training_step", counting)
    again = train(compose_train(base))
    assert steps == [] and again.to_dict() == json.loads(written["run.json"]) and again.val_loss == first.val_loss
    assert {name: (run_dir / name).read_bytes() for name in written} == written
    assert f"skipped {run_dir}: already finished" in capsys.readouterr().out

    changed = r"run.json was written with other settings than this run \(steps: 12 → 16\); run with the original"
    with pytest.raises(ValueError, match=changed):
        train(compose_train([*base, "trainer.max_steps=16"]))
    # Checkpoints deleted to save disk (common after a sweep): the record alone still decides.
    shutil.rmtree(run_dir / "checkpoints")
    assert train(compose_train(base)) == again
    with pytest.raises(ValueError, match=r"other settings than this run \(seed: 0 → 1\)"):
        train(compose_train([*base, "seed=1"]))
    assert steps == [] and (run_dir / "run.json").read_bytes() == written["run.json"]

    retrained = train(compose_train([*base, "resume=never"]))
    assert steps == list(range(12)) and retrained.val_loss == first.val_loss
