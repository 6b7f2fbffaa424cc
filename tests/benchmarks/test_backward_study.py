"""The quantized-backward loss study's own logic: paired statistics, the gradient-fidelity probe, and a finished
study folder summarized again into its report and record without training anything."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from bitlaw.benchmarks import backward_study
from bitlaw.benchmarks.backward_study import (
    GradientFidelity,
    PerturbInit,
    _agreement,
    paired,
    report,
    summarize,
)
from bitlaw.benchmarks.record import read_records
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.llama import LlamaConfig
from bitlaw.train.module import LitLlama


def test_paired_differences_mean_and_standard_error():
    mean, se, n = paired({0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0}, {0: 0.5, 1: 1.0, 2: 3.0})  # seed 3 has no pair
    diffs = [0.5, 1.0, 1.0]
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert n == 3 and math.isclose(mean, sum(diffs) / 3) and math.isclose(se, sd / math.sqrt(3))


def test_agreement_of_two_gradients():
    a, b = [torch.tensor([3.0, 0.0])], [torch.tensor([3.0, 4.0])]
    row = _agreement(a, b, "x_")
    assert math.isclose(row["x_cosine"], 0.6) and math.isclose(row["x_rel_error"], 4 / 3)


def test_fidelity_probe_compares_with_quest_and_restores_the_recipe(tmp_path):
    config = LlamaConfig(vocab_size=64, n_layer=1, d_model=128, n_head=1, max_seq_len=16).to_dict()
    lit = LitLlama(config, load_recipe("quest_w4a4_g8g8").to_dict(), {"lr": 1e-3}, 10,
                   {"seed": 0, "seq_len": 16, "global_batch": 2})

    class Trainer:
        global_step = 20
        accumulate_grad_batches = 1

    tokens = torch.randint(0, 64, (2, 16))
    out = tmp_path / "fidelity.jsonl"
    probe = GradientFidelity(str(out), every=20)
    probe.on_train_batch_start(Trainer(), lit, (tokens, tokens), 0)
    Trainer.global_step = 21  # not a probe step
    probe.on_train_batch_start(Trainer(), lit, (tokens, tokens), 0)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["step"] == 20 and 0.99 < row["cosine"] < 1 and 0 < row["rel_error"] < 0.05
    assert 0 < row["linear_rel_error"] < 0.05
    assert all(layer.recipe.name == "quest_w4a4_g8g8" and layer.recipe.quantized_backward
               for layer in lit.model.modules() if hasattr(layer, "recipe"))


def _lit() -> LitLlama:
    config = LlamaConfig(vocab_size=64, n_layer=1, d_model=128, n_head=1, max_seq_len=16).to_dict()
    return LitLlama(config, load_recipe("quest_w4a4").to_dict(), {"lr": 1e-3}, 10,
                    {"seed": 0, "seq_len": 16, "global_batch": 2})


def test_the_replica_moves_every_initial_weight_by_one_ulp_once():
    class Trainer:
        global_step = 0

    lit, twin = _lit(), _lit()
    before = {name: p.detach().clone() for name, p in lit.model.named_parameters()}
    PerturbInit(seed=3).on_train_start(Trainer(), lit)
    PerturbInit(seed=3).on_train_start(Trainer(), twin)
    ups = downs = 0
    for name, param in lit.model.named_parameters():
        old = before[name]
        moved_up = param == torch.nextafter(old, torch.full_like(old, math.inf))
        moved_down = param == torch.nextafter(old, torch.full_like(old, -math.inf))
        assert bool((moved_up ^ moved_down).all()), name  # one ulp, one way, every entry
        ups, downs = ups + int(moved_up.sum()), downs + int(moved_down.sum())
        assert torch.equal(param, dict(twin.model.named_parameters())[name]), name  # seeded: the same replica
    assert abs(ups - downs) < 0.02 * (ups + downs)
    Trainer.global_step = 7  # resumed: the weights stay
    moved = {name: p.detach().clone() for name, p in lit.model.named_parameters()}
    PerturbInit(seed=3).on_train_start(Trainer(), lit)
    assert all(torch.equal(p, moved[name]) for name, p in lit.model.named_parameters())


def test_the_report_sets_each_preset_against_the_replica(tmp_path):
    losses = {"bf16": [5.0, 5.2, 5.1], "quest_w4a4": [5.1, 5.3, 5.2], "quest_w4a4_replica": [5.2, 5.3, 5.3],
              "quest_w4a4_g8g8": [5.25, 5.32, 5.26]}
    for quant, values in losses.items():
        for seed, loss in enumerate(values):
            run = tmp_path / "runs" / f"tiny-{quant}-seed{seed}"
            run.mkdir(parents=True)
            (run / "full_val.json").write_text(json.dumps({"loss": loss}))
    summary = summarize(tmp_path, ["tiny"], list(losses), [0, 1, 2])
    rows = summary["tiny"]
    mean, se, n = rows["quest_w4a4_g8g8"]["vs_quest_w4a4_replica"]
    assert n == 3 and math.isclose(mean, (0.05 + 0.02 - 0.04) / 3)
    assert "vs_quest_w4a4_replica" not in rows["quest_w4a4"] and "vs_quest_w4a4_replica" not in rows["bf16"]
    text = report(summary)
    replica_mean, replica_se, _ = rows["quest_w4a4_replica"]["vs_quest_w4a4"]
    assert f"lands {replica_mean:+.4f} ± {replica_se:.4f}" in text
    assert f"(per-seed standard deviation {math.sqrt(3) * replica_se:.4f})" in text
    assert f"- quest_w4a4_g8g8: {mean:+.4f} ± {se:.4f}" in text


LOSSES = {"bf16": [5.0, 5.2, 5.1], "quest_w4a4": [5.1, 5.3, 5.2], "quest_w4a4_replica": [5.2, 5.3, 5.3],
          "quest_w4a4_g8g8": [5.25, 5.32, 5.26]}


def finished_study(out: Path) -> None:
    """A study folder as the study leaves it (the layout of every version): per run ``run.json``, ``full_val.json``
    (bitlaw-eval --json), ``metrics.csv`` and, for a recipe with a quantized backward, ``fidelity.jsonl``. Seed 2 of
    every recipe was trained at a later code version than seeds 0 and 1."""
    for quant, values in LOSSES.items():
        for seed, loss in enumerate(values):
            run = out / "runs" / f"tiny-{quant}-seed{seed}"
            run.mkdir(parents=True)
            version = "0.1.0+gf312d06" if seed < 2 else "0.1.0+g4aee6b5"
            (run / "run.json").write_text(json.dumps({"params_non_embedding": 3410176, "tokens": 321536,
                                                      "val_loss": loss - 0.1, "recipe": quant,
                                                      "code_version": version, "device": "cpu"}))
            (run / "full_val.json").write_text(json.dumps({"loss": loss, "windows": 261, "seq_len": 256,
                                                           "tokens": 66816}))
            with open(run / "metrics.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["step", "train/loss", "val/loss"])
                writer.writerows([[step, loss + 1 / (step + 1), ""] for step in range(30)])
            if quant == "quest_w4a4_g8g8":
                (run / "fidelity.jsonl").write_text("".join(
                    json.dumps({"step": step, "cosine": 0.9999 - 1e-5 * seed, "rel_error": 0.004 + 0.001 * seed,
                                "linear_cosine": 0.9998, "linear_rel_error": 0.006}) + "\n" for step in (0, 20)))


def test_a_finished_study_is_summarized_again_into_its_report_and_record(tmp_path, capsys):
    out, records = tmp_path / "study", tmp_path / "records"
    finished_study(out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    status = backward_study.main(["--out", str(out), "--models", "tiny", "--seeds", "0", "1", "2", "--quant",
                                  *LOSSES, "--record-dir", str(records)])
    assert status == 0
    assert {path: path.read_bytes() for path in before} == before  # no run trained, evaluated or rewritten
    assert {p.name for p in out.iterdir()} == {"runs", "results.json", "report.md", "curves.png"}
    summary = summarize(out, ["tiny"], list(LOSSES), [0, 1, 2])
    assert (out / "report.md").read_text() == report(summary) and report(summary) in capsys.readouterr().out
    (record,) = read_records(records)
    assert (record.benchmark, record.kind, record.module) == ("backward-study", "measured", backward_study.__name__)
    assert record.notes["code_versions"] == {"0.1.0+g4aee6b5": 4, "0.1.0+gf312d06": 8}
    assert record.device == "cpu"  # where the runs trained, from their run.json
    assert record.notes["evaluation"] == {"tiny": {"windows": 261, "seq_len": 256, "tokens": 66816}}
    rows = {row["recipe"]: row for row in record.rows}
    assert list(rows) == list(LOSSES)
    assert rows["bf16"]["val_loss"] == LOSSES["bf16"] and rows["bf16"]["seeds"] == [0, 1, 2]
    assert rows["quest_w4a4_g8g8"]["code_versions"] == ["0.1.0+gf312d06", "0.1.0+gf312d06", "0.1.0+g4aee6b5"]
    mean, se, n = summary["tiny"]["quest_w4a4_g8g8"]["vs_quest_w4a4_replica"]
    assert rows["quest_w4a4_g8g8"]["vs_quest_w4a4_replica"] == [mean, se, n]
    assert rows["quest_w4a4"]["vs_quest_w4a4"] is None and rows["bf16"]["fidelity"] is None
    assert rows["quest_w4a4_g8g8"]["fidelity"]["rel_error"] == pytest.approx([0.004, 0.005, 0.006])
    text = importlib.import_module(record.module).render(record)
    assert not text.startswith("#") and "**tiny** (seeds 0, 1, 2;" in text
    assert report(summary).split("\n", 2)[2] in text  # the report's tables, every figure from the record
    assert f"- quest_w4a4_g8g8: {mean:+.4f} ± {se:.4f}" in text
    assert "0.1.0+g4aee6b5 (4 runs), 0.1.0+gf312d06 (8 runs)" in text and f"commit {record.commit}" in text


def test_seeds_per_model(tmp_path, capsys):
    assert backward_study._model_seeds("mini=0,1,2") == ("mini", [0, 1, 2])
    for bad in ("mini=0", "huge=0,1", "mini=a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not allowed; allowed: MODEL=S,S"):
            backward_study._model_seeds(bad)
    with pytest.raises(SystemExit):
        backward_study.main(["--out", str(tmp_path), "--models", "tiny", "--model-seeds", "mini=0,1"])
    assert "--model-seeds names mini, not among --models tiny" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
