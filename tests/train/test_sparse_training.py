"""Sparse recipes through training: bad values stop the run before anything is prepared, runs recorded before the
sparsity fields existed still compare equal, and a RigL run trains, logs its fallback and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from bitlaw.kernels.recipe import load_recipe
from bitlaw.train.cli import train
from bitlaw.train.module import LitLlama
from bitlaw.train.plan import UsageError, plan_run
from bitlaw.train.settings import differences, run_settings
from tests.helpers import compose_train, small_overrides, train_losses

NEW_FIELDS = ("sparsity", "structure", "sparse_rule", "band", "schedule", "ramp", "update_every", "drop_fraction",
              "rigl_stop", "group", "outliers")


def _settings(recipe: dict) -> dict:
    return run_settings({"n_layer": 1}, recipe, "hash", {"lr": 1e-3}, 0, 32, 8, 12, 2, "32-true")


def test_a_run_recorded_before_the_sparsity_fields_existed_compares_equal():
    current = _settings(load_recipe("quest_w4a4").to_dict())
    recorded = {k: v for k, v in current.items() if k.rsplit(".", 1)[-1] not in NEW_FIELDS}
    assert len(recorded) < len(current) and differences(recorded, current) == []
    sparse = _settings(load_recipe("sparse50_w4a4").to_dict())
    assert any(d.startswith("quant.weight.sparsity: 0.0 → 0.5") for d in differences(recorded, sparse))


@pytest.mark.parametrize(("overrides", "expected"), [
    (["quant=sparse_2of4", "quant.weight.structure=4:2"], r"weight\.structure='4:2' is not allowed"),
    (["quant=sparse50_magnitude", "quant.weight.sparsity=1.5"], r"weight\.sparsity=1\.5 is not allowed"),
    (["quant=sparse_2of4", "quant.weight.structure=2:3"], r"structure='2:3' needs groups of M=3.*in_features=128"),
    (["quant=quest_w4a4_g32", "quant.input.group=48"], r"input\): group=48 does not divide in_features=128"),
    (["quant=rigl50", "+quant.input.sparsity=0.5", "+quant.input.sparse_rule=rigl"], r"input: sparse_rule='rigl'"),
])
def test_bad_sparsity_settings_fail_when_the_run_is_planned(tmp_path, corpus, overrides, expected):
    cfg = compose_train(small_overrides(corpus, tmp_path / "cache", tmp_path / "run") + overrides)
    with pytest.raises(UsageError, match=expected):
        plan_run(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_rigl_run_trains_logs_its_path_and_resumes_exactly(tmp_path, corpus, monkeypatch):
    cache = tmp_path / "cache"
    # 8 steps; RigL updates after steps 0, 2 and 4 (rigl_stop 0.75 of 8 steps); the crash comes after the checkpoint
    # of step 4, so the resumed run must restore the mask of the update after step 2 to match.
    # backend=triton (interpreted here) makes the recipe itself the reason for the fallback.
    rigl = ["quant.weight.update_every=2", "trainer.max_steps=8", "val_every=4", "backend=triton"]
    full = tmp_path / "full"
    record = train(compose_train(small_overrides(corpus, cache, full, "rigl50") + rigl))
    losses = train_losses(full)
    assert losses[7] < losses[0] - 0.5
    assert record.backends["mlp.down_proj"] == {
        "backend": "reference",
        "reason": "no Triton kernel: weight: sparsity 0.5 (structure row, rule rigl) runs only on the reference path"}
    state = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    mask = state["model.layers.0.mlp.down_proj.rigl_mask"]
    assert mask.shape == (128, 512) and (mask.sum(-1) == 256).all()
    assert (state["model.layers.0.mlp.down_proj.weight"][~mask] != 0).any()  # pruned master weights are kept

    resumed = tmp_path / "resumed"
    original = LitLlama.training_step

    def crash_at_step_5(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LitLlama, "training_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_train(small_overrides(corpus, cache, resumed, "rigl50") + rigl))
    monkeypatch.setattr(LitLlama, "training_step", original)
    train(compose_train(small_overrides(corpus, cache, resumed, "rigl50") + rigl))
    after = train_losses(resumed)
    assert all(after[s] == losses[s] for s in range(4, 8)), (after, losses)
    assert json.loads((resumed / "run.json").read_text())["val_loss"] == record.val_loss
