"""``python -m bitlaw.benchmarks.compression``: the table and the record ``compression`` from the reports of its
``bitlaw-compress`` runs (stubbed here: the methods themselves are tested in tests/compress), with the source model's
run record."""

from __future__ import annotations

import importlib
import json

from bitlaw.benchmarks import compression
from bitlaw.benchmarks.record import read_records


def _stage(loss: float, n_layer: int = 4, bits: float = 32.0, sparsity: float = 0.0, **info) -> dict:
    return {"eval": {"loss": loss, "perplexity": 2.718281828**loss, "bits_per_byte": loss / 2.4},
            "size": {"n_layer": n_layer, "bits_per_weight": bits, "sparsity": sparsity}, "info": info}


def fake_run(source: str, out, name: str, overrides: list[str]) -> dict:
    """A bitlaw-compress report of the shape the benchmark reads, its losses depending on the run."""
    losses = {"magnitude50-uniform": 4.6, "sparsegpt50-uniform": 4.55, "sparsegpt50-scheduled": 4.53}
    stages = [_stage(4.5)]
    if name in losses:
        stages.append(_stage(losses[name], sparsity=0.5))
    elif name == "gptq2-pv":
        stages += [_stage(4.54, bits=2.106), _stage(4.532, bits=2.106, best_step=30)]
    else:
        stages.append(_stage(4.58, n_layer=3, removed=[3], before_healing=_stage(4.85)["eval"]))
    return {"stages": stages, "calibration": {"sequences": 128, "length": 256, "seed": 0},
            "evaluation": {"windows": 261, "seq_len": 256}}


def test_the_record_holds_every_run_and_the_source_run(tmp_path, monkeypatch, capsys):
    source = tmp_path / "run"
    source.mkdir()
    (source / "run.json").write_text(json.dumps({"params_non_embedding": 3410176, "tokens": 1280000,
                                                 "val_loss": 4.0964, "recipe": "bf16",
                                                 "code_version": "0.1.0+gcae499c"}))
    monkeypatch.setattr(compression, "_run", fake_run)
    compression.main([str(source), "--sparsities", "0.5", "--bits", "2", "--pv-steps", "100", "--record-dir",
                      str(tmp_path / "records"), "data.cache_dir=x"])
    out = capsys.readouterr().out
    (record,) = read_records(tmp_path / "records")
    assert (record.benchmark, record.kind, record.module) == ("compression", "measured", compression.__name__)
    assert [(row["method"], row["loss"]) for row in record.rows] == [
        ("none (the trained model)", 4.5), ("magnitude uniform", 4.6), ("sparsegpt uniform", 4.55),
        ("sparsegpt scheduled", 4.53), ("GPTQ", 4.54), ("GPTQ + PV-tuning", 4.532), ("ShortGPT", 4.85),
        ("ShortGPT + healing", 4.58)]
    assert record.rows[5]["best_step"] == 30 and record.rows[1]["target_sparsity"] == 0.5
    assert record.notes["source_run"] == {"params_non_embedding": 3410176, "tokens": 1280000, "val_loss": 4.0964,
                                          "code_version": "0.1.0+gcae499c", "recipe": "bf16", "model_preset": None}
    assert record.notes["runs"] == 5 and record.notes["overrides"] == ["data.cache_dir=x"]
    text = importlib.import_module(record.module).render(record)
    for row in record.rows:
        line = (f"| {row['method']} | {row['setting']} | {row['loss']:.4f} | {row['loss'] - 4.5:+.4f} | "
                f"{row['perplexity']:.2f} | {row['bits_per_byte']:.4f} | {row['blocks']} | "
                f"{row['bits_per_weight']:.3f} | {row['sparsity']:.3f} |")
        assert line in text and line in out
    assert "N = 3,410,176 non-embedding parameters, 1,280,000 training tokens" in text
    assert "0.1.0+gcae499c" in text and "4.0964" in text and "128 × 256 tokens" in text


def test_a_source_that_is_not_a_run_directory_has_no_run_record(tmp_path):
    assert compression.source_run(str(tmp_path / "last.ckpt")) is None
    assert compression.source_run(str(tmp_path)) is None


def test_source_paths_with_an_equals_sign_reach_the_compress_config():
    # bitlaw-train names a run directory by its overrides (runs/tiny-bf16-seed0--tokens=1280000): Hydra's grammar
    # refuses the '=' unquoted.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bitlaw.benchmarks.compression import quoted

    parser = OverridesParser.create()
    for path in ("runs/tiny-bf16-seed0--tokens=1280000", "it's/a b\\c"):
        assert parser.parse_override(f"source={quoted(path)}").value() == path
