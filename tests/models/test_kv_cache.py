"""KV cache of models/llama.py: incremental decoding reproduces the full-sequence forward; overflow is an error."""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import KVCache, LlamaConfig, LlamaModel

VOCAB = 97
MAX_SEQ = 24


def small_model(recipe: str, n_layer: int = 2, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """d_model=128 so a Hadamard block of 128 fits every projection.

    init_std=0.1 (not the default 0.02) so logits spread over several units and a wrong position, mask or
    RoPE offset moves them far beyond the tolerance.
    """
    config = LlamaConfig(n_layer=n_layer, d_model=128, n_head=2, vocab_size=VOCAB, max_seq_len=MAX_SEQ,
                         init_std=0.1)
    model = LlamaModel(config)
    model.init_weights(torch.Generator().manual_seed(1))
    if recipe != "bf16":
        convert(model, load_recipe(recipe))
    return model.to(dtype).eval()


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# quest_w4a4 runs in float64: the cached and the full forward multiply matrices of different shapes, so their
# activations differ in the last float32 bits, and now and then such a difference moves an activation across a
# rounding boundary of the 4-bit grid (a whole step; seen in float32 within 20 decoded positions). In float64
# the differences are ~1e-15 and a crossing is practically impossible, so the comparison tests the cache alone.
# quest_w4 (weight-only) quantizes the same weights either way and stays continuous in the activations: float32.
CASES = [("bf16", torch.float32, 2, [5] + [1] * 15), ("bf16", torch.float32, 2, [5, 4, 1, 1, 3, 1, 5]),
         ("quest_w4a4", torch.float64, 2, [4, 1, 1, 3, 1, 2]), ("quest_w4", torch.float32, 1, [3, 1, 2, 1])]


@pytest.mark.parametrize(("recipe", "dtype", "n_layer", "chunks"), CASES,
                         ids=["bf16-prefill+1s", "bf16-mixed-chunks", "quest_w4a4-fp64", "quest_w4"])
@torch.no_grad()
def test_incremental_logits_equal_full_forward(recipe: str, dtype: torch.dtype, n_layer: int,
                                               chunks: list[int]) -> None:
    model = small_model(recipe, n_layer, dtype)
    ids = random_ids(2, sum(chunks))
    full = model(ids)
    cache = model.make_cache()
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model(ids[:, start:start + size], cache=cache))
        start += size
        assert cache.length == start
    incremental = torch.cat(pieces, dim=1)
    assert incremental.shape == full.shape == (2, sum(chunks), VOCAB) and incremental.dtype == dtype
    assert full.abs().max() > 0.5  # the comparison is not between near-zero logits
    torch.testing.assert_close(incremental, full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cache_positions_matter() -> None:
    """Feeding the last token without its cached prefix gives different logits: the cache is really read."""
    model = small_model("bf16")
    ids = random_ids(1, 8)
    cache = model.make_cache()
    model(ids[:, :7], cache=cache)
    with_prefix = model(ids[:, 7:], cache=cache)
    alone = model(ids[:, 7:])
    assert (with_prefix - alone).abs().max() > 1e-2


@torch.no_grad()
def test_targets_with_cache_give_the_loss_of_the_new_chunk() -> None:
    model = small_model("bf16")
    ids = random_ids(1, 10)
    full_logits = model(ids)
    cache = model.make_cache()
    model(ids[:, :6], cache=cache)
    logits, loss = model(ids[:, 6:9], targets=ids[:, 7:10], cache=cache)
    expected = torch.nn.functional.cross_entropy(full_logits[0, 6:9], ids[0, 7:10])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cache_overflow_is_a_clear_error() -> None:
    model = small_model("bf16")
    cache = model.make_cache()
    model(random_ids(1, MAX_SEQ - 1), cache=cache)
    model(random_ids(1, 1), cache=cache)  # exactly full is fine
    with pytest.raises(ValueError, match=rf"cache holds {MAX_SEQ} positions and 1 new tokens.*max_seq_len={MAX_SEQ}"):
        model(random_ids(1, 1), cache=cache)
    assert cache.length == MAX_SEQ  # the failed call changed nothing

    short = model.make_cache(max_len=6)
    model(random_ids(1, 4), cache=short)
    with pytest.raises(ValueError, match="would make 7, beyond the limit 6"):
        model(random_ids(1, 3), cache=short)
    short.reset()
    assert short.length == 0 and model(random_ids(1, 6), cache=short).shape == (1, 6, VOCAB)


def test_bad_cache_arguments_are_rejected() -> None:
    model = small_model("bf16")
    with pytest.raises(ValueError, match=rf"max_len=25 must be an int in \[1, max_seq_len={MAX_SEQ}\]"):
        model.make_cache(max_len=MAX_SEQ + 1)
    with pytest.raises(ValueError, match="KVCache.max_len must be a positive int, got 0"):
        KVCache(2, 0)
    with pytest.raises(ValueError, match="cache must be a KVCache for 2 layers"):
        model(random_ids(1, 2), cache=KVCache(3, 8))
    cache = model.make_cache()
    model(random_ids(2, 3), cache=cache)
    with pytest.raises(ValueError, match=r"holds batch=2.*got keys of shape \(1, 2, 1, 64\)"):
        model(random_ids(1, 1), cache=cache)
