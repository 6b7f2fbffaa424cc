"""Export: native round trip is bitwise, Hugging Face parity, sizes, exports from elsewhere and old versions, and
clear errors that overwrite nothing. Corrupted exports are in tests/test_faults.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitlaw.deploy.export import main
from bitlaw.deploy.hf import export_hf
from bitlaw.deploy.load import load_checkpoint, load_model, source_notes
from bitlaw.deploy.native import export_native
from bitlaw.kernels.recipe import Recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig
from tests.deploy.checkpoints import small_checkpoint
from tests.deploy.checkpoints import tokens as _tokens


def _checkpoint(tmp_path: Path, recipe_name: str, seed: int = 0) -> Path:
    return small_checkpoint(tmp_path, recipe_name, seed)


@pytest.mark.parametrize("recipe", ["bf16", "quest_w4a4", "quest_w1a1", "quest_w4", "lsq_w4a4", "quest_fp4",
                                    "quest_w8a8", "quest_w4_rotated"])
def test_native_round_trip_is_bitwise(tmp_path, recipe):
    trained = load_checkpoint(_checkpoint(tmp_path, recipe))
    sizes = export_native(trained, tmp_path / "export")
    loaded = load_model(tmp_path / "export")
    assert loaded.kind == "native" and loaded.recipe == trained.recipe
    with torch.no_grad():
        assert torch.equal(loaded.model(_tokens()), trained.model(_tokens()))
    if recipe in ("quest_w4a4", "quest_w1a1"):
        bits = 4 if recipe == "quest_w4a4" else 1
        assert sizes["block_weight_bytes"] == packed_block_bytes(trained.config, bits)


def packed_block_bytes(config: LlamaConfig, bits: int) -> int:
    """Bytes of a model's block projections packed at ``bits`` per code with one fp32 step per output row."""
    d, hidden = config.d_model, config.hidden
    shapes = [(d, d)] * 4 + [(hidden, d)] * 2 + [(d, hidden)]  # (out, in): q, k, v, o; gate, up; down
    return config.n_layer * sum(rows * (cols * bits // 8) + 4 * rows for rows, cols in shapes)


def test_the_documented_size_of_a_w4a4_tiny_export():
    # README and BENCHMARKS: the tiny preset's block weights take 1,748,992 bytes in a W4A4 export, 0.257x of bf16.
    tiny = LlamaConfig(n_layer=4, d_model=256, n_head=2, vocab_size=4096)
    weights = sum(rows * cols for rows, cols in [(256, 256)] * 4 + [(768, 256)] * 2 + [(256, 768)]) * 4
    assert packed_block_bytes(tiny, 4) == 1_748_992 and round(1_748_992 / (2 * weights), 3) == 0.257


def test_four_bit_file_is_small(tmp_path):
    bf16 = export_native(load_checkpoint(_checkpoint(tmp_path, "bf16")), tmp_path / "bf16")
    w4 = export_native(load_checkpoint(_checkpoint(tmp_path, "quest_w4a4")), tmp_path / "w4")
    # The bf16 run stores fp32 master weights; its bf16 size is what a bf16 export of the block weights takes.
    assert w4["block_weight_bytes"] == packed_block_bytes(load_checkpoint(_checkpoint(tmp_path, "bf16")).config, 4)
    assert w4["block_weight_bytes"] / bf16["block_weight_bytes_bf16"] < 0.27
    assert w4["file_bytes"] < bf16["file_bytes"]


@pytest.mark.parametrize("recipe", ["quest_w4a4", "quest_w2", "quest_w2_rotated"])
def test_hf_export_matches_weight_only_forward(tmp_path, recipe):
    transformers = pytest.importorskip("transformers")
    trained = load_checkpoint(_checkpoint(tmp_path, recipe))
    notes = export_hf(trained, tmp_path / "hf")
    assert any("weight-only" in n for n in notes) == (recipe == "quest_w4a4")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                       dtype=torch.float32).eval()
    weight_only = Recipe(name="w-only", weight=trained.recipe.weight, input=Recipe().input,
                         layout=trained.recipe.layout)
    convert(trained.model, weight_only)
    with torch.no_grad():
        ours = trained.model(_tokens())
        theirs = hf(input_ids=_tokens()).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["intermediate_size"] == 512 and config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == 1e-5 and config["num_key_value_heads"] == 1
    via_loader = load_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(via_loader.model(_tokens()), theirs)


def test_a_hugging_face_directory_from_elsewhere_loads_unverified(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    export_hf(load_checkpoint(_checkpoint(tmp_path, "quest_w2")), tmp_path / "hf")
    (tmp_path / "hf" / "bitlaw.json").unlink()  # as if written by another tool
    loaded = load_model(tmp_path / "hf")
    assert loaded.kind == "hf" and not loaded.verified and loaded.tokenizer_path is None
    assert source_notes(tmp_path / "hf", loaded) == [
        f"{tmp_path / 'hf'} has no bitlaw.json (not written by bitlaw-export): its files were not verified"]


def test_unknown_version_old_exports_and_foreign_file_names_are_refused(tmp_path: Path) -> None:
    export_native(load_checkpoint(_checkpoint(tmp_path, "quest_w4a4")), tmp_path / "e")
    meta_path = tmp_path / "e" / "bitlaw.json"
    good = meta_path.read_text()
    meta = json.loads(good)
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99 is not supported; this loader reads 'bitlaw-native' version 2"):
        load_model(tmp_path / "e")
    meta["version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 1 is not supported.*written by an earlier bitlaw"):
        load_model(tmp_path / "e")
    meta = json.loads(good)
    meta["files"]["../outside"] = {"bytes": 0, "sha256": ""}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lists the file name '../outside', which is not a plain file name"):
        load_model(tmp_path / "e")
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="bitlaw.json is not valid JSON"):
        load_model(tmp_path / "e")


def test_cli_refuses_to_overwrite_and_reports_sizes(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "quest_w4a4")
    out = tmp_path / "out"
    assert main([str(ckpt), "--format", "native", "--out", str(out), "--no-tokenizer"]) == 0
    assert "x of bf16" in capsys.readouterr().out
    stamp = (out / "model.safetensors").read_bytes()
    assert main([str(ckpt), "--format", "hf", "--out", str(out), "--no-tokenizer"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == stamp
    assert main([str(ckpt), "--format", "hf", "--out", str(out), "--force", "--no-tokenizer"]) == 0
    assert "activations run in high precision" in capsys.readouterr().out
    assert (out / "config.json").is_file() and json.loads((out / "bitlaw.json").read_text())["format"] == "bitlaw-hf"
    assert main([str(tmp_path / "missing.ckpt"), "--format", "native", "--out", str(tmp_path / "x")]) == 2
    assert "missing.ckpt' does not exist (allowed: a *.ckpt file, a run directory" in capsys.readouterr().err
    shutil.copytree(out, tmp_path / "copy")
    assert main([str(tmp_path / "copy"), "--format", "native", "--out", str(tmp_path / "x")]) == 2
    assert "copy is neither a training checkpoint nor a native export: bitlaw-export reads a *.ckpt file" in (
        capsys.readouterr().err)  # a Hugging Face export is no source for another export
    native = tmp_path / "native"
    assert main([str(ckpt), "--format", "native", "--out", str(native), "--no-tokenizer"]) == 0
    assert main([str(native), "--format", "compressed-tensors", "--out", str(tmp_path / "x")]) == 2
    assert "is a native export: --format compressed-tensors is written from training checkpoints only" in (
        capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
