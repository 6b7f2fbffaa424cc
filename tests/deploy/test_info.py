"""bitlaw-info: exact counts, grouped digits, bytes per recipe, the vocabulary and where it came from, clear
errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitlaw.deploy.info import main
from tests.helpers import TINY_RUN_RECIPE, small_overrides, tiny_run

ROOT = Path(__file__).resolve().parents[2]
TINY_N = 3_410_176  # non-embedding parameters of the tiny preset


def test_counts_and_bytes(capsys):
    assert main(["model=30m", "quant=quest_w4a4"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding parameters N: 30,482,560" in out
    assert "total parameters: 71,442,560" in out  # + 2 · 32000 · 640
    # 30,474,240 block weights at 4 bits + one fp32 scale per output row (6 layers × (4·640 + 2·1792 + 640) rows).
    rows = 6 * (4 * 640 + 2 * 1792 + 640)
    assert f"{30_474_240 // 2 + 4 * rows:,} bytes" in out
    assert "60,948,480 bytes" in out


def test_bf16_and_one_bit(capsys):
    assert main(["model=800m", "quant=bf16"]) == 0
    assert "822,151,168" in capsys.readouterr().out
    assert main(["model=800m", "quant=quest_w1a1"]) == 0
    assert "0.063x of bf16" in capsys.readouterr().out


def test_the_vocabulary_and_where_it_came_from(tmp_path, capsys):
    assert main(["model=tiny"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size 32,000: the model's default; training takes it from its data set's tokenizer (pass " \
           "data=<source> or model.vocab_size=N)" in out
    assert f"total parameters: {TINY_N + 2 * 32000 * 256:,}" in out

    assert main(["model=tiny", "model.vocab_size=4096"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size 4,096: model.vocab_size on the command line" in out
    assert f"total parameters: {TINY_N + 2 * 4096 * 256:,}" in out

    cache = tmp_path / "cache"  # nothing prepared there: the BPE's target size, said to be one
    assert main(["model=tiny", "data=embedded", f"data.cache_dir={cache}"]) == 0
    out = capsys.readouterr().out
    assert f"vocab_size 4,096: data.bpe_vocab_size of data=embedded data.cache_dir={cache}, the BPE's target size; " \
           f"data=embedded data.cache_dir={cache} is not prepared yet (no {cache}/embedded-" in out
    assert f"total parameters: {TINY_N + 2 * 4096 * 256:,}" in out

    assert main(["model=tiny", "data=c4", f"data.cache_dir={cache}"]) == 2
    assert "bitlaw-info: vocab_size unknown: data=c4" in capsys.readouterr().err


def test_a_prepared_data_set_gives_what_training_trains(corpus, tmp_path_factory, capsys):
    base = tmp_path_factory.getbasetemp()
    run_dir = tiny_run(corpus, base)
    record = json.loads((run_dir / "run.json").read_text())
    overrides = [o for o in small_overrides(corpus, base / "cache", run_dir, TINY_RUN_RECIPE)
                 if o.startswith(("data", "model.", "quant="))]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert f"vocab_size {record['model']['vocab_size']:,}: the prepared data set of data=files" in out
    assert f"total parameters: {record['params_total']:,}" in out


@pytest.mark.parametrize(("args", "message"), [
    (["model=31m"], "Could not find 'model/31m'"),
    (["quant=quest_w5a5"], "Could not find 'quant/quest_w5a5'"),
    (["model.n_layr=3"], "Could not override 'model.n_layr'"),
    (["model=tiny", "model.d_model=200", "model.n_head=2", "quant=quest_w4a4"], "block=128 does not divide"),
    (["model=tiny", "model.vocab_size=many"], "model.vocab_size='many' must be an integer >= 1"),
    (["data=nonesuch"], "Could not find 'data/nonesuch'"),
])
def test_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "bitlaw.deploy.info", "model=tiny", "quant=quest_w2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipe quest_w2: weight int2" in proc.stdout and "input bf16 (not quantized)" in proc.stdout


def test_every_preset_says_which_kernels_train_it_on_cuda(capsys):
    from bitlaw.kernels.recipe import recipe_names

    paths = {}
    for name in recipe_names():
        assert main(["model=tiny", f"quant={name}"]) == 0
        (line,) = [text for text in capsys.readouterr().out.splitlines() if text.startswith("on CUDA: ")]
        paths[name] = line
    assert paths["bf16"] == "on CUDA: nn.Linear (cuBLAS bf16); nothing is quantized"
    for name in ("quest_w4a4", "quest_w1a1", "quest_w2a2", "quest_w3a3"):
        assert "fast path (fused Triton quantizers, torch._scaled_mm on fp8 e4m3 codes" in paths[name], name
    assert "8-bit gradients on the same vendor GEMMs" in paths["quest_w4a4_g8g8"]
    # What stays on the reference says why, naming the field.
    assert "format 'fp4_e2m1'" in paths["quest_fp4"] and "lsq" in paths["lsq_w4a4"]
    assert all(line.startswith(("on CUDA: the fast path", "on CUDA: the reference path (plain PyTorch), not the "
                                "fast path: ", "on CUDA: nn.Linear")) for line in paths.values())
