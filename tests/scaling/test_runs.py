"""The run table: run records and CSV files in, clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from bitlaw.kernels.recipe import load_recipe
from bitlaw.scaling.runs import levels, load_runs, read_csv, read_run_dirs, write_csv


def _record(directory, N=1e6, D=2e7, loss=3.5, recipe="quest_w4a4"):
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("seed: 0\n")
    (directory / "run.json").write_text(json.dumps({"params_non_embedding": N, "tokens": D, "val_loss": loss,
                                                    "recipe": load_recipe(recipe).to_dict(), "steps": 10}))


def test_run_directories_are_collected_recursively_and_unfinished_ones_are_named(tmp_path):
    _record(tmp_path / "sweep" / "a", N=1e6, recipe="bf16")
    _record(tmp_path / "sweep" / "b", N=2e6, loss=3.1)
    (tmp_path / "sweep" / "c").mkdir()
    (tmp_path / "sweep" / "c" / "config.yaml").write_text("seed: 0\n")  # started, never finished
    first = tmp_path / "sweep" / "a" / ".hydra"
    for hydra in (first, first / "2026-12-01_20-43-07-825760"):
        hydra.mkdir(parents=True)  # Hydra's copies of the config, one set per attempt: not run directories
        (hydra / "config.yaml").write_text("seed: 0\n")
    with pytest.warns(UserWarning, match=r"skipped 1 unfinished run directory .*sweep/c"):
        runs = read_run_dirs(tmp_path / "sweep")
    assert [(r.N, r.D, r.loss, r.recipe_name) for r in runs] == [(1e6, 2e7, 3.5, "bf16"), (2e6, 2e7, 3.1, "quest_w4a4")]
    assert runs[1].recipe == load_recipe("quest_w4a4")


def test_directory_without_run_json_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FileNotFoundError, match=r"run: no run.json in this directory or below it"):
        load_runs([tmp_path / "run"])
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such file or directory"):
        load_runs([tmp_path / "nowhere"])


def test_run_record_missing_a_key_or_with_a_bad_value_is_an_error(tmp_path):
    _record(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    del record["val_loss"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"run.json: run record lacks val_loss; required: params_non_embedding, "
                                         r"tokens, val_loss, recipe"):
        load_runs([tmp_path / "run"])
    record["val_loss"] = float("nan")
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"val_loss=nan is not allowed; allowed: a positive finite number"):
        load_runs([tmp_path / "run"])


def test_csv_round_trip_and_extra_columns(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("recipe,N,D,loss,note\nquest_w4a4,1e6,2e7,3.5,first\nbf16, 2000000 ,4e7,3.0,\n")
    runs = read_csv(path)
    assert [(r.N, r.D, r.loss, r.recipe_name) for r in runs] == [(1e6, 2e7, 3.5, "quest_w4a4"), (2e6, 4e7, 3.0, "bf16")]
    write_csv(runs, tmp_path / "again.csv")
    assert [(r.N, r.D, r.loss, r.recipe) for r in read_csv(tmp_path / "again.csv")] == \
        [(r.N, r.D, r.loss, r.recipe) for r in runs]


def test_csv_missing_a_column_unknown_recipe_or_bad_value_is_an_error(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("N,D,recipe\n1e6,2e7,bf16\n")
    with pytest.raises(ValueError, match=r"runs.csv: missing column\(s\) loss; required: N, D, loss, recipe"):
        load_runs([path])
    path.write_text("N,D,loss,recipe\n1e6,2e7,3.5,bf16\n1e6,2e7,3.6,int4_magic\n")
    with pytest.raises(ValueError, match=r"runs.csv:3: unknown recipe 'int4_magic'; allowed .*quest_w4a4"):
        load_runs([path])
    path.write_text("N,D,loss,recipe\n1e6,-2e7,3.5,bf16\n")
    with pytest.raises(ValueError, match=r"runs.csv:2: D='-2e7' is not allowed"):
        load_runs([path])
    path.write_text("N,D,loss,recipe\n")
    with pytest.raises(ValueError, match=r"no rows below the header"):
        load_runs([path])
    (tmp_path / "runs.txt").write_text("N,D,loss,recipe\n")
    with pytest.raises(ValueError, match=r"runs.txt: not a run source; allowed: a directory, a run.json file, a "
                                         r"\.csv file"):
        load_runs([tmp_path / "runs.txt"])


def test_two_recipes_under_one_name_are_refused(tmp_path):
    _record(tmp_path / "a", recipe="quest_w4a4")
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    record["recipe"]["input"] = {"format": "bf16"}  # weight-only, still called quest_w4a4
    _record(tmp_path / "b")
    (tmp_path / "b" / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="recipe name 'quest_w4a4' names two different recipes"):
        load_runs([tmp_path / "a", tmp_path / "b"])


def test_levels_group_values_within_ten_percent():
    assert levels([100.0, 1.0, 1.05, 2.0, 1.9, 98.0]) == [[1, 2], [4, 3], [5, 0]]
    assert levels([1.0, 1.09, 1.18, 1.3]) == [[0, 1], [2], [3]]  # a level spans < 10 %: no chaining


def test_speed_and_backend_come_from_the_record_and_mixed_paths_are_flagged(tmp_path):
    from bitlaw.core.records import RunRecord
    from bitlaw.scaling.report import throughput_section
    from bitlaw.scaling.runs import backend_summary, run_from_record

    def record(recipe, backend, speed):
        kinds = {} if backend is None else {k: {"backend": backend, "reason": None} for k in ("mlp.up_proj", "o")}
        return RunRecord(params_non_embedding=1_000_000, tokens=10_000_000, val_loss=3.0,
                         recipe=load_recipe(recipe).to_dict(), tokens_per_s=speed, backends=kinds,
                         device="NVIDIA H100 80GB HBM3")

    bf16 = run_from_record(record("bf16", None, 9000.0), "a")
    fused = run_from_record(record("quest_w4a4", "triton", 8000.0), "b")
    slow = run_from_record(record("quest_w1a1", "reference", 2000.0), "c")
    assert (bf16.backend, fused.backend, slow.backend) == ("none", "triton", "reference")
    assert fused.tokens_per_s == 8000.0 and fused.device == "NVIDIA H100 80GB HBM3"
    assert backend_summary({"q": {"backend": "triton"}, "k": {"backend": "reference"}}) == "mixed"
    like = "\n".join(throughput_section([bf16, fused]))
    assert "| quest_w4a4 | 1 | 8,000 | triton |" in like and "Warning" not in like
    mixed = "\n".join(throughput_section([bf16, fused, slow]))
    assert "**Warning: the quantized runs mixed kernel paths (reference: 1, triton: 1 runs)" in mixed
    # The run table keeps the speed columns through its CSV form.
    write_csv([fused, slow], tmp_path / "runs.csv")
    again = read_csv(tmp_path / "runs.csv")
    assert [(r.tokens_per_s, r.backend, r.device) for r in again] == [(8000.0, "triton", "NVIDIA H100 80GB HBM3"),
                                                                     (2000.0, "reference", "NVIDIA H100 80GB HBM3")]
