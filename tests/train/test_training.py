"""The training system end to end on a tiny model: loss falls, resume is exact, errors come before compute."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitlaw.kernels.recipe import load_recipe, recipe_names
from bitlaw.models.llama import LlamaModel
from bitlaw.train.callbacks import NonFiniteLossError
from bitlaw.train.cli import train
from bitlaw.train.config import OptimConfig
from bitlaw.train.module import LitLlama, decay_groups, lr_at
from bitlaw.train.trainer import build_trainer
from tests.helpers import compose_train, small_overrides, train_cli, train_losses

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_group_composes_and_instantiates(tmp_path, corpus):
    groups = {"model": sorted(p.stem for p in (ROOT / "conf/model").glob("*.yaml")),
              "trainer": sorted(p.stem for p in (ROOT / "conf/trainer").glob("*.yaml")),
              "logger": sorted(p.stem for p in (ROOT / "conf/logger").glob("*.yaml")),
              "callbacks": sorted(p.stem for p in (ROOT / "conf/callbacks").glob("*.yaml")),
              "data": ["embedded", "files", "c4", "fineweb_edu"],
              "quant": recipe_names(),
              "experiment": sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))}
    for group, options in groups.items():
        for option in options:
            cfg = compose_train([f"{group}={option}", f"run_dir={tmp_path}"])
            assert group == "experiment" or cfg[group] is not None
            if group in ("trainer", "logger", "callbacks"):
                if cfg.trainer.accelerator == "gpu":
                    continue  # a GPU Trainer cannot be instantiated on this machine; composing is checked above
                trainer = build_trainer(cfg, steps=10)  # every logger and callback instantiated from its _target_
                assert len(trainer.loggers) == len(cfg.logger) and len(cfg.callbacks) >= 3
    for quant in recipe_names():
        cfg = compose_train([f"quant={quant}", "model.vocab_size=64"])
        module = LitLlama(dict(cfg.model), dict(cfg.quant), dict(cfg.optim), 10,
                          {"seed": 0, "seq_len": 16, "global_batch": 2})
        _, loss = module(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
        assert torch.isfinite(loss)


def test_typos_and_wrong_types_fail_at_start():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_train(["optim.learning_rate=1e-3"])
    with pytest.raises(ConfigCompositionException):
        compose_train(["global_batch=many"])
    with pytest.raises(ConfigCompositionException):
        compose_train(["trainer.max_step=5"])


@pytest.mark.parametrize("quant", ["bf16", "quest_w4a4"])
def test_few_steps_lower_the_loss_and_write_the_run_record(tmp_path, corpus, quant):
    run_dir = tmp_path / "run"
    record = train(compose_train(small_overrides(corpus, tmp_path / "cache", run_dir, quant)))
    losses = train_losses(run_dir)
    assert losses[11] < losses[0] - 0.5
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["val_loss"] == record.val_loss < saved["unigram_entropy_nats"] + 0.5
    assert saved["tokens"] == 12 * 8 * 32 and saved["recipe"]["name"] == quant
    assert saved["params_non_embedding"] == 4 * 128 * 128 + 3 * 128 * 512 + 3 * 128
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    with open(run_dir / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    assert {"lr", "tokens_seen", "train/device/items_per_sec", "val/loss"} <= set(header)
    assert saved["throughput"]["source"].startswith("Throughput callback") and saved["tokens_per_s"] > 0
    if quant != "bf16":
        assert "mask/layers.0.mlp.down_proj.weight" in header and "backend/mlp.down_proj" in header
        reason = "backend=auto on cpu tensors (the Triton kernels run on CUDA)"
        assert saved["backends"]["self_attn.q_proj"] == {"backend": "reference", "reason": reason}
        assert set(saved["backends"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    else:
        assert saved["backends"] == {}


def test_kill_and_resume_gives_bitwise_identicaltrain_losses(tmp_path, corpus, monkeypatch):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train(compose_train(small_overrides(corpus, cache, full, "quest_w4a4")))

    resumed = tmp_path / "resumed"
    original = LitLlama.training_step

    def crash_at_step_9(self, batch, batch_idx):
        if self.global_step == 9:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LitLlama, "training_step", crash_at_step_9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_train(small_overrides(corpus, cache, resumed, "quest_w4a4")))
    assert not (resumed / "run.json").exists()
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    monkeypatch.setattr(LitLlama, "training_step", original)
    before = train_losses(resumed)
    train(compose_train(small_overrides(corpus, cache, resumed, "quest_w4a4")))
    after = train_losses(resumed)
    expected = train_losses(full)
    assert set(after) == set(range(12)) and set(before) == set(range(9))
    assert all(after[s] == expected[s] for s in range(8, 12)), (after, expected)
    assert json.loads((resumed / "run.json").read_text())["val_loss"] == \
        json.loads((full / "run.json").read_text())["val_loss"]


def test_schedule_matches_the_formula():
    optim = OptimConfig(lr=1e-3, warmup_fraction=0.1, start_ratio=0.01, end_ratio=0.1)
    total = 101
    assert lr_at(0, total, optim) == pytest.approx(1e-5)
    assert lr_at(5, total, optim) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half way up the warmup
    assert lr_at(10, total, optim) == pytest.approx(1e-3)
    assert lr_at(55, total, optim) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, total, optim) == pytest.approx(1e-4)
    steps = [lr_at(s, total, optim) for s in range(total)]
    assert max(steps) == pytest.approx(1e-3) and steps.index(max(steps)) == 10


def test_module_scheduler_follows_lr_at():
    optim = {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0,
             "warmup_fraction": 0.2, "start_ratio": 0.01, "end_ratio": 0.1}
    module = LitLlama({"n_layer": 1, "d_model": 128, "n_head": 1, "vocab_size": 64}, {"name": "bf16"}, optim,
                      20, {"seed": 0, "seq_len": 8, "global_batch": 2})
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, 20, OptimConfig(**optim)))
        opt.step()
        sched.step()


def test_weight_decay_lands_on_block_linear_weights_only():
    module = LitLlama({"n_layer": 2, "d_model": 128, "n_head": 1, "vocab_size": 64}, {"name": "lsq_w4a4",
                      "weight": {"format": "int4", "scale": "lsq", "grad": "ste"},
                      "input": {"format": "int4", "scale": "lsq", "grad": "ste"}}, dict(OptimConfig().__dict__),
                      10, {"seed": 0, "seq_len": 8, "global_batch": 2})
    decay, no_decay = decay_groups(module.model)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    expected = {f"layers.{i}.{proj}.weight" for i in range(2) for proj in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert decayed == expected
    assert {"lm_head.weight", "embed_tokens.weight", "norm.weight",
            "layers.0.mlp.up_proj.weight_lsq_scale"} <= {names[id(p)] for p in no_decay}
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_quest_lsq_steps_are_decayed_with_the_weights():
    module = LitLlama({"n_layer": 1, "d_model": 128, "n_head": 1, "vocab_size": 64}, load_recipe("lsq_w4a4").to_dict(),
                      dict(OptimConfig().__dict__), 10, {"seed": 0, "seq_len": 8, "global_batch": 2})
    decay, no_decay = decay_groups(module.model)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    for proj in ("self_attn.q_proj", "mlp.down_proj"):
        assert {f"layers.0.{proj}.{p}" for p in ("weight", "weight_lsq_scale", "input_lsq_scale")} <= decayed
    assert not {n for n in decayed if not n.startswith("layers.0.")}
    assert {"lm_head.weight", "norm.weight"} <= {names[id(p)] for p in no_decay}


def test_bad_input_fails_before_compute_and_keeps_what_was_written(tmp_path, corpus):
    run_dir = tmp_path / "run"
    base = small_overrides(corpus, tmp_path / "cache", run_dir)
    missing = train_cli([*base, "data.paths=[/nonexistent/corpus.jsonl]"], tmp_path)
    assert missing.returncode == 2 and "/nonexistent/corpus.jsonl" in missing.stderr
    width = train_cli([*base, "quant=quest_w4a4", "model.d_model=192", "model.n_head=3"], tmp_path)
    assert width.returncode == 2 and "block=128 does not divide in_features=192" in width.stderr
    assert not run_dir.exists()
    unknown = train_cli([*base, "quant=quest_w5a5"], tmp_path)
    assert unknown.returncode != 0 and "quest_w5a5" in unknown.stderr and "quest_w4a4" in unknown.stderr

    train(compose_train(base))
    last = run_dir / "checkpoints" / "last.ckpt"
    stamp = last.read_bytes()
    changed = r"was written with other settings than this run \(model.n_layer: 1 → 2; steps: 12 → 16\)"
    with pytest.raises(ValueError, match=changed):
        train(compose_train([*base, "model.n_layer=2", "trainer.max_steps=16"]))
    assert last.read_bytes() == stamp


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    run_dir = tmp_path / "run"
    original = LlamaModel.forward

    def poisoned(self, input_ids, targets=None):
        logits, loss = original(self, input_ids, targets)
        if self.training:
            if getattr(self, "_train_calls", 0) == 6:
                loss = loss * math.nan
            self._train_calls = getattr(self, "_train_calls", 0) + 1
        return logits, loss

    monkeypatch.setattr(LlamaModel, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 6; the last good checkpoint is"):
        train(compose_train(small_overrides(corpus, tmp_path / "cache", run_dir)))
    # Checked at step 8 (a checkpoint step) before the checkpoint is written: the NaN weights never reach a file.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (run_dir / "checkpoints" / "step0000008.ckpt").exists()
    assert not (run_dir / "run.json").exists()


_POISONED_MAIN = """
import math
import sys

import torch

from bitlaw.models.llama import LlamaModel
from bitlaw.train.cli import main
from bitlaw.train.module import LitLlama

original = LlamaModel.forward


def poisoned(self, input_ids, targets=None, cache=None):
    out = original(self, input_ids, targets, cache)
    if self.training and targets is not None:
        calls = getattr(self, "_calls", 0)
        self._calls = calls + 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if calls == 6 and rank == {rank_with_nan}:
            return out[0], out[1] * math.nan
    return out


def crash(self, batch, batch_idx):
    raise RuntimeError("a bug deep inside training")


LlamaModel.forward = poisoned
if {crash}:
    LitLlama.training_step = crash
main()
"""


def _script(tmp_path: Path, rank_with_nan: int = -1, crash: bool = False) -> Path:
    path = tmp_path / "poisoned_train.py"
    path.write_text(_POISONED_MAIN.format(rank_with_nan=rank_with_nan, crash=crash))
    return path


def test_nan_on_one_ddp_rank_stops_both_ranks_at_its_step(tmp_path, corpus):
    run_dir = tmp_path / "ddp"
    args = [*small_overrides(corpus, tmp_path / "cache", run_dir), "trainer.devices=2", "trainer.strategy=ddp"]
    done = subprocess.run([sys.executable, str(_script(tmp_path, rank_with_nan=1)), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "bitlaw-train: stopped: non-finite training loss at step 6; the last good checkpoint is" in done.stderr
    assert "Traceback" not in done.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (run_dir / "checkpoints" / "step0000008.ckpt").exists() and not (run_dir / "run.json").exists()


def test_a_bug_keeps_its_traceback_and_user_errors_are_one_line(tmp_path, corpus):
    base = small_overrides(corpus, tmp_path / "cache", tmp_path / "run")
    bug = subprocess.run([sys.executable, str(_script(tmp_path, crash=True)), *base], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bug.returncode == 1 and "Traceback" in bug.stderr
    assert "RuntimeError: a bug deep inside training" in bug.stderr
    user = train_cli([*base, "seq_len=100000"], tmp_path)
    assert user.returncode == 2 and "Traceback" not in user.stderr
    assert user.stderr.strip().splitlines() == ["bitlaw-train: seq_len=100000 must be in [1, model.max_seq_len=256]"]


def test_two_process_ddp_matches_one_process(tmp_path, corpus):
    cache = tmp_path / "cache"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = train_cli(small_overrides(corpus, cache, single), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train_cli([*small_overrides(corpus, cache, ddp), "trainer.devices=2", "trainer.strategy=ddp"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(single), train_losses(ddp)
    assert set(a) == set(b) == set(range(12))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (single, ddp))
    assert rb["world_size"] == 2 and rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)


def test_wandb_logger_is_offline_without_an_api_key(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    trainer = build_trainer(compose_train(["logger=wandb", f"run_dir={tmp_path}"]), steps=10)
    wandb = next(logger for logger in trainer.loggers if isinstance(logger, WandbLogger))
    assert wandb._offline is True and len(trainer.loggers) == 2
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    trainer = build_trainer(compose_train(["logger=wandb", f"run_dir={tmp_path}"]), steps=10)
    assert next(logger for logger in trainer.loggers if isinstance(logger, WandbLogger))._offline is False
