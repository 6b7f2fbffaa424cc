"""Generation: the KV cache decodes like full recomputation, sampling is seeded, filters, streaming, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from bitlaw.deploy.generate import TextStream, filter_top_k, filter_top_p, generate, main
from bitlaw.deploy.load import load_model
from bitlaw.deploy.native import export_native
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel
from tests.helpers import tiny_run

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 97


def random_model(recipe: str = "bf16", max_seq_len: int = 48, dtype: torch.dtype = torch.float32,
                 n_layer: int = 2) -> LlamaModel:
    """Random weights with init_std=0.1: peaked enough that greedy paths vary, flat enough that sampling varies."""
    config = LlamaConfig(n_layer=n_layer, d_model=128, n_head=2, vocab_size=VOCAB, max_seq_len=max_seq_len,
                         init_std=0.1)
    model = LlamaModel(config)
    model.init_weights(torch.Generator().manual_seed(3))
    if recipe != "bf16":
        convert(model, load_recipe(recipe))
    return model.to(dtype).eval()


PROMPT = [5, 17, 42, 8]


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    return tiny_run(corpus, tmp_path_factory.getbasetemp())


# quest_w4a4 in float64: see tests/models/test_kv_cache.py (float32 rounding differences between the cached and
# the full forward can cross a rounding boundary of the activation grid and change a greedy choice).
@pytest.mark.parametrize(("recipe", "dtype", "steps"), [("bf16", torch.float32, 12), ("quest_w4a4", torch.float64, 8)])
@torch.no_grad()
def test_greedy_with_cache_equals_recomputing_the_sequence(recipe: str, dtype: torch.dtype, steps: int) -> None:
    model = random_model(recipe, dtype=dtype, n_layer=1 if recipe != "bf16" else 2)  # 1 quantized layer: faster
    tokens = list(PROMPT)
    for _ in range(steps):  # the reference: the whole sequence through the model at every step, arg-max
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    expected = tokens[len(PROMPT):]
    assert len(set(expected)) > 3  # a path that moves, not one token repeated
    assert generate(model, PROMPT, steps, greedy=True) == expected
    assert generate(model, PROMPT, steps, greedy=True, use_cache=False) == expected


def test_seeded_sampling_is_reproducible() -> None:
    model = random_model()

    def sample(seed: int) -> list[int]:
        return generate(model, PROMPT, 24, temperature=1.0, top_k=40, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert len(first) == 24 and sample(0) == first
    assert sample(1) != first


def test_top_k_1_equals_greedy() -> None:
    model = random_model()
    greedy = generate(model, PROMPT, 16, greedy=True)
    for seed in (0, 1):
        sampled = generate(model, PROMPT, 16, temperature=0.7, top_k=1, top_p=1.0,
                           generator=torch.Generator().manual_seed(seed))
        assert sampled == greedy


def test_top_p_keeps_the_smallest_set_with_enough_mass() -> None:
    probs = torch.tensor([0.10, 0.50, 0.05, 0.20, 0.15])  # sorted: 0.50 (1), 0.20 (3), 0.15 (4), 0.10 (0), 0.05 (2)
    logits = probs.log()
    cases = {0.3: {1}, 0.5: {1}, 0.69: {1, 3}, 0.71: {1, 3, 4}, 0.86: {1, 3, 4, 0}, 0.96: {0, 1, 2, 3, 4},
             1.0: {0, 1, 2, 3, 4}}
    for p, kept in cases.items():
        filtered = filter_top_p(logits, p)
        assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == kept, p
        assert torch.equal(filtered[list(kept)], logits[list(kept)])  # survivors keep their logits
    # Rows are independent: the same distribution reversed keeps the mirrored set.
    both = filter_top_p(torch.stack([logits, logits.flip(0)]), 0.69)
    assert torch.isfinite(both).tolist() == [[False, True, False, True, False], [False, True, False, True, False]]


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 2.0]])
    assert torch.isfinite(filter_top_k(logits, 2)).sum() == 2
    assert torch.isfinite(filter_top_k(logits, 3))[0].tolist() == [False, True, True, False, True]
    assert torch.equal(filter_top_k(logits, 0), logits) and torch.equal(filter_top_k(logits, 9), logits)


def test_stops_at_eos_and_at_the_context_limit() -> None:
    model = random_model(max_seq_len=12)
    greedy = generate(model, PROMPT, 8, greedy=True)
    assert len(greedy) == 8  # 4 + 8 = max_seq_len
    assert generate(model, PROMPT, 30, greedy=True) == greedy  # stops at the context limit
    assert generate(model, PROMPT, 8, greedy=True, eos_id=greedy[0]) == []
    cut = greedy.index(greedy[2])  # the first occurrence of the third token ends the text there
    assert generate(model, PROMPT, 8, greedy=True, eos_id=greedy[2]) == greedy[:cut]
    streamed: list[int] = []
    generate(model, PROMPT, 5, greedy=True, on_token=streamed.append)
    assert streamed == greedy[:5]


def test_bad_arguments_are_rejected_before_decoding() -> None:
    model = random_model(max_seq_len=12)
    with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
        generate(model, PROMPT, 4, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        generate(model, PROMPT, 4, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k=-1 must be an int >= 0"):
        generate(model, PROMPT, 4, top_k=-1)
    with pytest.raises(ValueError, match=r"the prompt has 13 tokens; allowed: 1 to max_seq_len=12"):
        generate(model, list(range(13)), 4, greedy=True)
    with pytest.raises(ValueError, match=r"the prompt has 0 tokens"):
        generate(model, [], 4, greedy=True)
    assert generate(model, PROMPT, 4, temperature=0.0, greedy=True) == generate(model, PROMPT, 4, greedy=True)


def test_text_stream_never_prints_half_a_character(run_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(load_model(run_dir / "checkpoints" / "last.ckpt").tokenizer_path))
    text = "the fox — café 東京 🦊 ends"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # the tokenizer never saw these characters: several byte tokens each
    prefix = 2
    stream = TextStream(tokenizer, ids[:prefix])
    pieces = [stream.push(token) for token in ids[prefix:]]
    pieces.append(stream.finish())
    assert "".join(pieces) == text[len(tokenizer.decode(ids[:prefix])):]
    assert not any("\ufffd" in piece for piece in pieces)


def test_cli_streams_the_greedy_continuation(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-m", "bitlaw.deploy.generate", str(ckpt), "--prompt", "the quick",
                             "--max-new-tokens", "12", "--greedy"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = load_model(ckpt)
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_path))
    prompt_ids = tokenizer.encode("the quick", add_special_tokens=False).ids
    new = generate(loaded.model, prompt_ids, 12, greedy=True, eos_id=tokenizer.token_to_id("<|endoftext|>"))
    assert new  # the trained model continues the prompt with text
    assert result.stdout == tokenizer.decode(prompt_ids + new) + "\n"


def test_cli_sampling_is_seeded_and_native_export_generates_the_same(run_dir: Path, tmp_path: Path,
                                                                     capsys) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export_native(load_model(ckpt), tmp_path / "native")
    outputs = []
    for source in (ckpt, tmp_path / "native", ckpt, run_dir):
        assert main([str(source), "--prompt", "a lazy", "--max-new-tokens", "12", "--seed", "7"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("a lazy") and len(outputs[0]) > len("a lazy\n")
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    assert main([str(ckpt), "--prompt", "a lazy", "--max-new-tokens", "12", "--seed", "8"]) == 0
    assert capsys.readouterr().out != outputs[0]


def test_a_run_directory_says_which_checkpoint_it_used(run_dir: Path, capsys) -> None:
    assert main([str(run_dir), "--prompt", "a lazy", "--max-new-tokens", "2", "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"using {run_dir / 'checkpoints' / 'last.ckpt'}, the last checkpoint of run directory "
                            f"{run_dir}\n")
    assert captured.out.startswith("a lazy")


def test_cli_errors_are_clear(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        ([str(tmp_path / "missing.ckpt"), "--prompt", "x"], "missing.ckpt' does not exist (allowed: a *.ckpt file"),
        ([ckpt, "--prompt", "x", "--device", "cuda"], "--device 'cuda': CUDA is not available on this machine "
                                                      "(torch.cuda.is_available() is False); use --device cpu"),
        ([ckpt, "--prompt", "x", "--device", "cuda:x"], "--device 'cuda:x' is not a device name"),
        ([ckpt, "--prompt", "x", "--temperature", "0"], "temperature=0.0 must be > 0 when sampling"),
        ([ckpt, "--prompt", "x", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
        ([ckpt, "--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        ([ckpt, "--prompt", "x", "--tokenizer", str(tmp_path / "none.json")], "none.json': no such file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("bitlaw-generate: ") and message in captured.err, captured.err
        assert captured.out == "" and captured.err.count("\n") == 1
    assert main([ckpt, "--prompt", "x", "--temperature", "0", "--greedy", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("x")  # --greedy makes temperature irrelevant
