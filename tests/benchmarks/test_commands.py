"""The benchmark commands that run bitlaw's own console commands — the quick start, the export kinds, a sweep with
its fit — end to end on a one-layer model trained for a few steps: each writes a well-formed record whose figures
are those of the run records, manifests and fit it produced, and whose ``render`` shows them. Timings are recorded,
never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bitlaw.benchmarks import exports, quickstart, report, sweep
from bitlaw.benchmarks.record import BenchmarkRecord, read_records
from bitlaw.core.records import ExportManifest, RunRecord
from bitlaw.deploy.native import packed_layer_bytes
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.llama import LlamaConfig, LlamaModel
from tests.helpers import small_overrides

# The benchmarks set the run directory themselves; the recipe is set per test.
_LEFT_OUT = ("run_dir=", "quant=", "trainer.max_steps=", "val_every=", "val_batches=", "ckpt_every=",
             "mask_stats_every=")


@pytest.fixture(scope="module")
def overrides(corpus, tmp_path_factory) -> list[str]:
    """A one-layer model on the test corpus, 3 steps, one validation batch; the data set prepared once."""
    cache = tmp_path_factory.mktemp("cache")
    kept = [o for o in small_overrides(corpus, cache, Path("unused")) if not o.startswith(_LEFT_OUT)]
    return [*kept, "trainer.max_steps=3", "val_every=3", "val_batches=1", "ckpt_every=3", "mask_stats_every=0"]


def only_record(directory: Path) -> BenchmarkRecord:
    records = read_records(directory)
    assert len(records) == 1
    assert report.load(directory) == records  # well-formed: what the report reads
    report.section(records[0])  # and renders
    return records[0]


def test_quickstart_records_the_command_and_its_run(overrides, tmp_path, capsys):
    workdir, records_dir = tmp_path / "work", tmp_path / "records"
    assert quickstart.main(["--workdir", str(workdir), "--record-dir", str(records_dir), *overrides]) == 0
    record = only_record(records_dir)
    assert (record.benchmark, record.kind, record.module) == ("quickstart", "measured", quickstart.MODULE)
    assert record.command.startswith("python -m bitlaw.benchmarks.quickstart --workdir ")
    run_dirs = [path.parent for path in workdir.rglob("run.json")]
    assert len(run_dirs) == 1
    run = RunRecord.read(run_dirs[0])
    row = record.rows[0]
    assert row["wall_s"] > 0
    assert (row["steps"], row["tokens"], row["val_loss"], row["tokens_per_s"], row["unigram_entropy_nats"]) == (
        run.steps, run.tokens, run.val_loss, run.tokens_per_s, run.unigram_entropy_nats)
    assert record.notes["summary_line"].startswith(f"final validation loss {run.val_loss:.4f} nats/token")
    assert record.notes["summary_line"].endswith(f"{run_dirs[0].name}/run.json")
    text = quickstart.render(record)
    for figure in (f"| {run.steps:,} | {run.tokens:,} | {run.tokens_per_s:,.0f} | {run.val_loss:.4f} | "
                   f"{run.unigram_entropy_nats:.4f} |", record.notes["summary_line"], "not the README's command"):
        assert figure in text
    capsys.readouterr()
    # The quick start runs in a fresh directory: a used one is refused before anything runs.
    assert quickstart.main(["--workdir", str(workdir), "--no-record", *overrides]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


def block_shapes(model: dict) -> list[tuple[int, int]]:
    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig.from_dict(model))
    return [tuple(m.weight.shape) for name, m in llama.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.")]


def test_exports_record_sizes_and_the_measured_losses(overrides, tmp_path, monkeypatch):
    # Two of quest_w4z's exports: native (exact, not measured) and compressed-tensors with the rotation folded
    # (requantized: the export command measures it).
    monkeypatch.setattr(exports, "exports_of", lambda recipe: [("native", []), ("compressed-tensors",
                                                                                ["--rotation", "folded"])])
    work, records_dir = tmp_path / "work", tmp_path / "records"
    argv = ["--work", str(work), "--record-dir", str(records_dir), "--recipes", "quest_w4z", "--", *overrides]
    assert exports.main(argv) == 0
    record = only_record(records_dir)
    assert (record.benchmark, record.kind) == ("exports", "measured")
    assert {"transformers", "compressed-tensors"} <= set(record.versions)
    run = RunRecord.read(work / "runs" / "quest_w4z")
    assert record.notes["runs"]["quest_w4z"]["this_command"] == "trained"
    assert record.notes["runs"]["quest_w4z"]["val_loss"] == run.val_loss

    native, folded = record.rows
    manifest = ExportManifest.from_dict(json.loads((work / "exports" / "quest_w4z-native" / "bitlaw.json").read_text()),
                                        "native")
    shapes = block_shapes(manifest.model)
    fmt = load_recipe("quest_w4z").weight.fmt
    assert native["block_bytes"] == sum(packed_layer_bytes(out, inp, fmt, False) for out, inp in shapes)
    assert native["block_bytes_bf16"] == 2 * sum(out * inp for out, inp in shapes)
    assert native["file_bytes"] == (work / "exports" / "quest_w4z-native" / "model.safetensors").stat().st_size
    assert native["checkpoint_loss"] is None and native["weights"] == "4-bit codes + fp32 row steps, exact"
    # compressed-tensors 4-bit: per projection the packed int32 words, an fp32 scale per row, an int64 shape.
    assert folded["block_bytes"] == sum(out * inp // 2 + 4 * out + 16 for out, inp in shapes)
    assert folded["export"] == "compressed-tensors W4A16, rotation folded (`--rotation folded`)"
    assert folded["weights"] == "requantized to 4 bits"
    assert folded["checkpoint_loss"] == pytest.approx(run.val_loss, abs=1e-5)  # training's validation windows
    assert folded["difference"] == pytest.approx(folded["export_loss"] - folded["checkpoint_loss"])

    text = exports.render(record)
    for figure in (f"{native['block_bytes']:,}", f"{native['block_bytes'] / native['block_bytes_bf16']:.3f}x",
                   f"{folded['file_bytes']:,}", f"{folded['checkpoint_loss']:.4f} | {folded['export_loss']:.4f}",
                   f"| quest_w4z | 3 | {run.tokens:,} | {run.val_loss:.4f} | trained |"):
        assert figure in text

    # A finished run is reused, not trained again.
    finished = (work / "runs" / "quest_w4z" / "run.json").read_text()
    assert exports.train(work, "quest_w4z", overrides)["this_command"] == "reused (already finished)"
    assert (work / "runs" / "quest_w4z" / "run.json").read_text() == finished


def test_exports_refuses_an_unknown_recipe(capsys):
    assert exports.main(["--no-record", "--recipes", "fp4"]) == 2
    assert "allowed: bf16, quest_w4, quest_w4z, quest_w4a4" in capsys.readouterr().err


SUBDIR = "hydra.sweep.subdir=L${model.n_layer}-${quant.name}-s${trainer.max_steps}"


def test_sweep_records_runs_trained_skipped_and_the_fit(overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [o for o in overrides if not o.startswith("trainer.max_steps=")]
    # An earlier launch: one run the sweep below skips (bf16, 2 steps), one outside its grid (bf16, 5 steps).
    earlier = subprocess.run([sys.executable, "-m", "bitlaw.train", "-m", "hydra.sweep.dir=sweep", *common, SUBDIR,
                              "quant=bf16", "trainer.max_steps=2,5"], capture_output=True, text=True, timeout=600)
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    grid = [*common, SUBDIR, "quant=bf16,quest_w4a4", "trainer.max_steps=2,3,4"]
    assert sweep.main(["--name", "sweep-test", "--sweep-dir", "sweep", "--record-dir", "records",
                       "--bootstrap", "2", "--forms", "decoupled", "--", *grid]) == 0
    record = only_record(tmp_path / "records")
    assert (record.benchmark, record.kind, record.title) == ("sweep-test", "measured",
                                                             f"Sweep `{' '.join(grid)}` and its law fit")
    notes = record.notes
    assert (notes["trained"], notes["skipped"]) == (5, 1)
    assert notes["sweep_wall_s"] > 0 and notes["fit_wall_s"] > 0
    assert notes["fit_command"] == "bitlaw-fit sweep --out fits/sweep --bootstrap 2 --forms decoupled"
    launches = {row["run"]: row["this_launch"] for row in record.rows}
    assert launches == {"L1-bf16-s2": "skipped", "L1-bf16-s3": "trained", "L1-bf16-s4": "trained",
                        "L1-bf16-s5": "earlier launch", "L1-quest_w4a4-s2": "trained",
                        "L1-quest_w4a4-s3": "trained", "L1-quest_w4a4-s4": "trained"}
    for row in record.rows:
        run = RunRecord.read(tmp_path / "sweep" / row["run"])
        assert (row["N"], row["D"], row["recipe"], row["val_loss"], row["code_version"]) == (
            run.params_non_embedding, run.tokens, run.recipe_name, run.val_loss, run.code_version)
    assert [row["D"] for row in record.rows] == sorted(row["D"] for row in record.rows)
    fit = json.loads((tmp_path / "fits" / "sweep" / "fit.json").read_text())["decoupled"]
    summary = notes["fit"]["decoupled"]
    assert (summary["rmse"], summary["n_runs"], summary["warnings"]) == (fit["rmse"], 7, len(fit["warnings"]))
    assert summary["capacity"]["quest_w4a4"]["value"] == fit["capacity"]["quest_w4a4"]

    text = sweep.render(record)
    assert "trained 5 runs and skipped 1 already finished ones" in text
    assert "1 of the runs in the folder come from earlier launches" in text
    assert f"| decoupled | 7 | {fit['rmse']:.4f} | {len(fit['warnings'])} |" in text
    assert sweep.capacity_cell(summary["capacity"]["quest_w4a4"]) in text and "ρ quest_w4a4" in text
    for row in record.rows:
        assert f"| {row['recipe']} | {row['val_loss']:.4f} |" in text


@pytest.mark.parametrize("argv, message", [
    (["--name", "a b", "--sweep-dir", "s", "experiment=cpu_mini_sweep"], "--name 'a b' is not allowed"),
    (["--name", "x", "--sweep-dir", "s", "hydra.sweep.dir=t"], "hydra.sweep.dir=t are not allowed"),
])
def test_sweep_refuses_bad_arguments_before_running(argv, message, capsys):
    assert sweep.main(["--no-record", *argv]) == 2
    assert message in capsys.readouterr().err
