"""Evaluation: loss against a hand computation, bits per byte, the run's val_loss reproduced, the CLI, errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from bitlaw.data.shards import load_prepared
from bitlaw.deploy.evaluate import _ByteCounter, evaluate, main
from bitlaw.deploy.load import load_model
from bitlaw.deploy.native import export_native
from bitlaw.models.llama import LlamaConfig, LlamaModel
from tests.helpers import tiny_run

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 61
MULTIBYTE_TEXT = "the fox — café 東京 🦊 naïve über the lazy dog. " * 6


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    return tiny_run(corpus, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tokenizer(run_dir: Path) -> Tokenizer:
    record = json.loads((run_dir / "run.json").read_text())
    return load_prepared(record["data"]["directory"]).load_tokenizer()


def random_model(vocab_size: int = VOCAB) -> LlamaModel:
    config = LlamaConfig(n_layer=1, d_model=64, n_head=2, vocab_size=vocab_size, max_seq_len=32, init_std=0.1)
    model = LlamaModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@torch.no_grad()
def test_loss_equals_a_hand_computation() -> None:
    model = random_model()
    tokens = np.random.default_rng(0).integers(0, VOCAB, 200)
    seq_len = 16
    for max_batches, n_windows in ((2, 6), (None, 12)):  # (200 - 1) // 16 = 12 whole windows
        result = evaluate(model, tokens, seq_len, batch_size=3, max_batches=max_batches)
        losses = []
        for window in range(n_windows):  # one window at a time, straight from the definition
            chunk = torch.as_tensor(tokens[window * seq_len:window * seq_len + seq_len + 1])
            logits = model(chunk[None, :-1])[0]
            losses.append(F.cross_entropy(logits, chunk[1:], reduction="none"))
        expected = torch.cat(losses).double().mean().item()
        assert result["tokens"] == n_windows * seq_len and result["windows"] == n_windows
        assert result["loss"] == pytest.approx(expected, rel=1e-6)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
        assert result["bytes"] is None and result["bits_per_byte"] is None
    assert abs(result["loss"] - math.log(VOCAB)) > 0.05  # random weights, not a uniform predictor


def test_byte_count_is_exact_across_chunk_boundaries(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT[:60], add_special_tokens=False).ids
    assert len(ids) > len(MULTIBYTE_TEXT[:60].encode()) / 2  # byte-level pieces of unseen characters
    for cut in range(len(ids) + 1):  # every split, including inside the bytes of 東, 京 and 🦊
        counter = _ByteCounter(tokenizer)
        counter.add(ids[:cut])
        counter.add(ids[cut:])
        assert counter.finish() == len(MULTIBYTE_TEXT[:60].encode("utf-8")), cut


def test_bits_per_byte_are_consistent(tokenizer: Tokenizer) -> None:
    model = random_model(tokenizer.get_vocab_size(with_added_tokens=True))
    ids = np.asarray(tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False).ids, dtype=np.int64)
    seq_len, batch_size = 7, 2
    n_windows = (len(ids) - 1) // seq_len
    # Batches cover consecutive spans of 14 target tokens; some span must end inside a character for this to
    # test the byte count across batch boundaries.
    span_ends = range(1 + seq_len * batch_size, n_windows * seq_len + 1, seq_len * batch_size)
    assert any(tokenizer.decode(ids[1:end].tolist()).endswith("\ufffd") for end in span_ends)
    result = evaluate(model, ids, seq_len, batch_size, None, tokenizer)
    targets = ids[1:n_windows * seq_len + 1].tolist()
    assert result["bytes"] == len(tokenizer.decode(targets).encode("utf-8")) > result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * result["bytes"]),
                                                    rel=1e-12)


def test_validation_loss_matches_the_run_record(run_dir: Path) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    loaded = load_model(run_dir / "checkpoints" / "last.ckpt")
    data = load_prepared(record["data"]["directory"])
    # The run validated on val_batches=2 batches of global_batch windows of seq_len (tests/train/conftest.py).
    result = evaluate(loaded.model, data.val_tokens, record["seq_len"], record["global_batch"], 2,
                      data.load_tokenizer())
    assert result["tokens"] == 2 * record["global_batch"] * record["seq_len"]
    assert result["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    assert 0 < result["bits_per_byte"] < result["loss"] / math.log(2)  # more than one byte per token


def test_cli_reproduces_val_loss_from_the_run_and_from_a_native_export(run_dir: Path, tmp_path: Path,
                                                                       capsys) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-m", "bitlaw.deploy.evaluate", str(ckpt), "--max-batches", "2", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    from_ckpt = json.loads(result.stdout)
    assert from_ckpt["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    assert from_ckpt["seq_len"] == record["seq_len"] and from_ckpt["data"] == record["data"]["directory"]
    assert "loss " in result.stderr and "bits/byte" in result.stderr  # the summary line, beside the JSON

    export_native(load_model(ckpt), tmp_path / "native")
    assert main([str(tmp_path / "native"), "--data-dir", record["data"]["directory"], "--seq-len",
                 str(record["seq_len"]), "--batch-size", str(record["global_batch"]), "--max-batches", "2",
                 "--json", "--no-progress"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_export["kind"] == "native" and from_export["loss"] == from_ckpt["loss"]
    assert from_export["bits_per_byte"] == from_ckpt["bits_per_byte"]


def test_cli_on_a_text_file(run_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(MULTIBYTE_TEXT + "the quick brown fox jumps over a lazy dog. " * 8, encoding="utf-8")
    assert main([str(run_dir / "checkpoints" / "last.ckpt"), "--text", str(text), "--seq-len", "16",
                 "--batch-size", "4", "--max-batches", "3", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("loss ") and line.count("\n") == 1
    loss, bpb = float(line.split()[1]), float(line.split("bits/byte ")[1].split()[0])
    assert 0 < bpb < loss / math.log(2)


def test_windows_training_reproduces_the_run_record_and_every_summary_says_which_windows(run_dir: Path,
                                                                                        capsys) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    data = record["data"]["directory"]
    assert main([str(run_dir), "--windows", "training", "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    training = json.loads(captured.out)
    assert training["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    assert training["selection"] == "training" and training["source"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert training["windows"] == record["val_batches"] * record["global_batch"] == 16
    assert f"using {run_dir / 'checkpoints' / 'last.ckpt'}, the last checkpoint of run directory {run_dir}\n" in (
        captured.err)
    assert (f"| the first 16 windows (2 batches of 8, seq_len 32) of the validation split of {data}, as training's "
            f"validation, run.json val_loss {record['val_loss']:.4f} |") in captured.err

    assert main([str(run_dir), "--json", "--no-progress"]) == 0  # the default: the whole split
    whole = json.loads(capsys.readouterr().out)
    assert whole["selection"] == "all" and whole["windows"] == whole["windows_total"] > 16
    assert whole["evaluated"] == f"all {whole['windows']} windows (seq_len 32) of the validation split of {data}"
    assert whole["loss"] != pytest.approx(record["val_loss"], rel=1e-6)  # other windows, another number

    assert main([str(run_dir), "--max-batches", "3", "--no-progress"]) == 0
    assert (f"| the first 24 of {whole['windows']} windows (3 batches of 8, seq_len 32) of the validation split of "
            f"{data} |") in capsys.readouterr().out


def test_cli_errors_are_clear(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    loose = tmp_path / "loose.ckpt"  # a checkpoint outside its run directory: no run.json to find the data
    shutil.copyfile(ckpt, loose)
    unfinished = tmp_path / "unfinished"  # a run directory without run.json: the run has not finished
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copyfile(ckpt, unfinished / "checkpoints" / "last.ckpt")
    shutil.copyfile(run_dir / "config.yaml", unfinished / "config.yaml")
    moved = tmp_path / "moved"  # a run whose data set is not on this machine (copied from another one)
    shutil.copytree(run_dir, moved)
    record = json.loads((moved / "run.json").read_text())
    record["data"]["directory"] = str(tmp_path / "elsewhere")
    (moved / "run.json").write_text(json.dumps(record))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        ([str(moved)], f"was trained on the data set prepared at '{tmp_path / 'elsewhere'}' (config hash "
                       f"{record['data']['config_hash'][:12]}), which is not on this machine: prepare it again"),
        ([str(tmp_path / "missing.ckpt")], "missing.ckpt' does not exist (allowed: a *.ckpt file, a run directory"),
        ([str(ckpt), "--text", str(tmp_path / "absent.txt")], "--text '" + str(tmp_path / "absent.txt")),
        ([str(ckpt), "--data-dir", str(tmp_path / "nodata")], "nodata' is not a prepared data set (no meta.json)"),
        ([str(loose)], f"no validation data known for {loose}: {loose} is not a checkpoint in a run directory"),
        ([str(unfinished)], f"{unfinished / 'run.json'} does not exist (the run has not finished"),
        ([str(ckpt), "--seq-len", "0"], "--seq-len=0 must be >= 1"),
        ([str(ckpt), "--seq-len", "4096"], "--seq-len=4096 exceeds the model's max_seq_len=256"),
        ([str(run_dir), "--windows", "training", "--seq-len", "16", "--max-batches", "1"],
         "--windows training takes the data set, seq_len, global_batch and val_batches from the run's run.json: "
         "drop --seq-len, --max-batches"),
        ([str(loose), "--windows", "training"], f"needs the record of the training run: {loose} is not a checkpoint in "
                                                "a run directory"),
        ([str(unfinished), "--windows", "training"], f"{unfinished / 'run.json'} does not exist"),
        ([str(ckpt), "--device", "cuda"], "--device 'cuda': CUDA is not available on this machine"),
        ([str(ckpt), "--device", "gpu0"], "--device 'gpu0' is not a device name (allowed: cpu, cuda, cuda:N, mps)"),
    ]
    for argv, message in cases:
        assert main(argv + ["--no-progress"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("bitlaw-eval: ") and message in captured.err, captured.err
        assert captured.out == "" and captured.err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse: --text and --data-dir exclude each other
        main([str(ckpt), "--text", "a.txt", "--data-dir", "d"])
    with pytest.raises(ValueError, match="8 tokens hold no window of seq_len=16"):
        evaluate(random_model(), np.zeros(8, dtype=np.int64), 16, 2)
