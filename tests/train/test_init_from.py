"""``init_from``: a run that starts from a bitlaw checkpoint's weights, model and recipe (fine-tuning, healing after
compression) with a fresh optimizer and schedule; bad checkpoints fail before anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from bitlaw.core.config import CONF_DIR
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel
from bitlaw.train.cli import main, train
from bitlaw.train.config import register_configs
from bitlaw.train.module import LitLlama
from bitlaw.train.plan import UsageError, plan_run, prepare_run_data
from tests.helpers import compose_train, small_overrides

CHECKPOINT_RECIPE = "quest_w4a4"  # quantized: the weights only fit once the recipe's layers are swapped in


def minimal_checkpoint(path: Path, vocab_size: int, n_layer: int = 2, seed: int = 123) -> dict[str, torch.Tensor]:
    """Write the smallest file ``init_from`` accepts (what bitlaw-compress writes): ``{"bitlaw": {"model",
    "recipe"}, "state_dict"}`` of a ``n_layer``-block model seeded differently from any training run; return its
    state dict."""
    config = LlamaConfig(n_layer=n_layer, d_model=128, n_head=1, vocab_size=vocab_size, max_seq_len=64)
    recipe = load_recipe(CHECKPOINT_RECIPE)
    torch.manual_seed(seed)
    model = LlamaModel(config)
    convert(model, recipe)
    state = {f"model.{key}": value.detach().clone() for key, value in model.state_dict().items()}
    torch.save({"bitlaw": {"model": config.to_dict(), "recipe": recipe.to_dict()}, "state_dict": state}, path)
    return state


def test_init_from_takes_model_recipe_and_weights_and_starts_fresh(tmp_path, corpus, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    # The command line asks for 1 layer of bf16; the checkpoint has 2 quantized layers, and they win.
    base = small_overrides(corpus, tmp_path / "cache", run_dir, "bf16")
    vocab_size = prepare_run_data(plan_run(compose_train(base))).vocab_size
    assert not run_dir.exists()
    checkpoint = tmp_path / "healed.ckpt"
    state = minimal_checkpoint(checkpoint, vocab_size)

    seen: dict[str, object] = {}
    original = LitLlama.training_step

    def first_step(self, batch, batch_idx):
        if not seen:  # before the first optimizer step: what training starts from
            seen.update(step=self.global_step, lr=self.optimizers().param_groups[0]["lr"],
                        state={k: v.detach().clone() for k, v in self.state_dict().items()})
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LitLlama, "training_step", first_step)
    record = train(compose_train([*base, f"init_from={checkpoint}", "trainer.max_steps=2", "val_every=2",
                                  "ckpt_every=2", "mask_stats_every=0"]))

    # (a) the architecture and recipe are the checkpoint's, not the model and quant groups'
    assert record.model["n_layer"] == 2 and record.recipe["name"] == CHECKPOINT_RECIPE
    assert record.init_from == str(checkpoint.resolve()) and record.steps == 2
    out = capsys.readouterr().out
    assert (f"init_from {checkpoint.resolve()}: model and recipe from the checkpoint (n_layer=2, d_model=128, "
            f"recipe {CHECKPOINT_RECIPE}); fresh optimizer and schedule") in out
    # (b) step 0 starts from exactly the checkpoint's weights, at the start of a fresh schedule
    assert seen["step"] == 0 and seen["lr"] == pytest.approx(0.01 * 3e-3)
    assert seen["state"].keys() == state.keys() and any(".layers.1." in key for key in state)
    assert all(torch.equal(seen["state"][key], state[key]) for key in state)
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved["bitlaw"]["init_from"] == str(checkpoint.resolve())
    assert not torch.equal(saved["state_dict"]["model.layers.1.mlp.down_proj.weight"],
                           state["model.layers.1.mlp.down_proj.weight"])  # and then it trained
    assert json.loads((run_dir / "run.json").read_text())["init_from"] == str(checkpoint.resolve())
    # A run directory means its checkpoints/last.ckpt: fine-tuning the fine-tuned run, 2 layers again.
    again = plan_run(compose_train([*base, f"init_from={run_dir}", f"run_dir={tmp_path / 'run2'}"]))
    assert again.init_from == run_dir / "checkpoints" / "last.ckpt" and again.model["n_layer"] == 2


def test_checkpoints_that_do_not_fit_are_refused_before_anything_is_written(tmp_path, corpus):
    base = small_overrides(corpus, tmp_path / "cache", tmp_path / "run", "bf16")
    vocab_size = prepare_run_data(plan_run(compose_train(base))).vocab_size
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    wrong_vocab = tmp_path / "vocab.ckpt"
    minimal_checkpoint(wrong_vocab, vocab_size + 1)
    missing_key = tmp_path / "pruned.ckpt"
    minimal_checkpoint(missing_key, vocab_size)
    pruned = torch.load(missing_key, weights_only=False)
    del pruned["state_dict"]["model.layers.1.mlp.up_proj.weight"]
    pruned["state_dict"]["model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)
    torch.save(pruned, missing_key)
    cases = {
        "notes.txt": r"notes.txt is not a bitlaw checkpoint \(torch cannot read it",
        "plain.ckpt": r"plain.ckpt is not a bitlaw checkpoint \(no 'bitlaw' entry",
        "no-such-run": r"no-such-run does not exist; allowed: a bitlaw checkpoint file",
        "vocab.ckpt": rf"the checkpoint's vocab_size={vocab_size + 1} differs from the data set's tokenizer "
                      rf"\({vocab_size} tokens",
        "pruned.ckpt": r"missing keys: model.layers.1.mlp.up_proj.weight; unexpected keys: "
                       r"model.layers.2.mlp.up_proj.weight",
    }
    for name, message in cases.items():
        with pytest.raises(UsageError, match=rf"init_from='{tmp_path / name}': .*{message}"):
            train(compose_train([*base, f"init_from={tmp_path / name}"]))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(UsageError, match=r"empty-dir has no checkpoints/last.ckpt; allowed"):
        train(compose_train([*base, f"init_from={tmp_path / 'empty-dir'}"]))
    assert not (tmp_path / "run").exists()


def test_default_run_directory_names_the_checkpoint_and_a_bad_path_writes_nothing(tmp_path, corpus, monkeypatch,
                                                                                   capsys):
    def run_dir_for(overrides: list[str]) -> str:
        """The default run directory ``bitlaw-train *overrides`` would train in (as RunDirectoryCheck resolves it)."""
        register_configs()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return str(OmegaConf.select(cfg, "hydra.run.dir"))

    source = "/data/runs/30m-quest_w4a4-seed0--tokens_per_param=100/checkpoints/last.ckpt"
    named = run_dir_for([f"init_from='{source}'", "optim.lr=0.004", "model=30m", "quant=bf16"])
    # One directory level under runs/, named after the checkpoint's run; not after the unused model/quant groups.
    assert named.startswith("runs/from-30m-quest_w4a4-seed0--tokens_per_param=100-") and named.count("/") == 1
    assert named.endswith("-seed0--optim.lr=0.004") and "tiny" not in named and "bf16" not in named
    assert run_dir_for([f"init_from='{source.replace('/data/', '/other/')}'"]) != named.removesuffix("--optim.lr=0.004")
    assert run_dir_for(["optim.lr=0.004"]) == "runs/tiny-bf16-seed0--optim.lr=0.004"  # without init_from: as before

    overrides = [o for o in small_overrides(corpus, tmp_path / "cache", tmp_path / "unused")
                 if not o.startswith("run_dir=")]
    # The command itself (in this process: a fresh one would spend most of the test importing torch and Lightning).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bitlaw-train", *overrides, f"init_from={tmp_path / 'nowhere' / 'last.ckpt'}"])
    with pytest.raises(SystemExit) as failed:
        main()
    stderr = capsys.readouterr().err
    assert failed.value.code == 2 and f"init_from='{tmp_path / 'nowhere' / 'last.ckpt'}': " in stderr
    assert "does not exist; allowed: a bitlaw checkpoint file" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run directory, no data cache, no Hydra record
