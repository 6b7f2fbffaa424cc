"""ShortGPT: Block Influence scores, choosing the blocks to drop, and a pruned model that still decodes with a cache."""

from __future__ import annotations

import pytest
import torch

from bitlaw.compress.shortgpt import block_influence, lowest_influence, remove_blocks
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel


def tiny_model(n_layer: int = 5, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(LlamaConfig(n_layer=n_layer, d_model=32, n_head=4, vocab_size=64, max_seq_len=32,
                                   mlp_hidden=48, init_std=0.2))
    return model.eval()


def make_identity(model: LlamaModel, index: int) -> None:
    """Zero the block's residual output projections: it then returns its input unchanged."""
    with torch.no_grad():
        model.layers[index].self_attn.o_proj.weight.zero_()
        model.layers[index].mlp.down_proj.weight.zero_()


def tokens(n_seq: int = 8, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n_seq, seq), generator=torch.Generator().manual_seed(seed))


def test_block_influence_in_range_and_zero_for_identity_block():
    model = tiny_model()
    make_identity(model, 2)
    bi = block_influence(model, [tokens()])
    assert len(bi) == 5
    assert all(0.0 <= b <= 2.0 for b in bi)
    assert bi[2] == pytest.approx(0.0, abs=1e-12)
    assert min(b for i, b in enumerate(bi) if i != 2) > 1e-4  # the other blocks do turn the stream


def test_block_influence_does_not_depend_on_batching():
    model = tiny_model()
    data = tokens()
    splits = {size: block_influence(model, list(data.split(size))) for size in (8, 2, 1)}
    reference = splits[8]
    for bi in splits.values():
        assert bi == pytest.approx(reference, rel=1e-6, abs=1e-9)
        assert sorted(range(5), key=bi.__getitem__) == sorted(range(5), key=reference.__getitem__)


def test_block_influence_weighs_tokens_not_batches():
    model = tiny_model()
    data = tokens(n_seq=3, seq=12)
    # One long batch and one short one: a per-batch average would weigh the short batch's tokens more.
    uneven = block_influence(model, [data[:2], data[2:, :4]])
    separate = [block_influence(model, [data[:2]]), block_influence(model, [data[2:, :4]])]
    expected = [(24 * a + 4 * b) / 28 for a, b in zip(*separate, strict=True)]
    assert uneven == pytest.approx(expected, rel=1e-9)


def test_lowest_influence_picks_smallest_with_ties_to_lower_index():
    assert lowest_influence([0.3, 0.1, 0.2, 0.1, 0.5], 2) == [1, 3]
    assert lowest_influence([0.2, 0.2, 0.2], 1) == [0]
    assert lowest_influence([0.4, 0.1], 0) == []


@pytest.mark.parametrize("n", [-1, 3, 4, 1.0, True])
def test_lowest_influence_refuses_bad_n(n):
    with pytest.raises(ValueError, match=rf"n={n!r} of 3 blocks"):
        lowest_influence([0.1, 0.2, 0.3], n)


def test_remove_blocks_refuses_bad_indices():
    model = tiny_model(n_layer=3)
    for indices, message in (([3], "not block indices"), ([1, 1], "repeat"), ([0, 1, 2], "leaves none")):
        with pytest.raises(ValueError, match=message):
            remove_blocks(model, indices)
    assert len(model.layers) == 3  # nothing was removed by a refused call


def skipping_forward(model: LlamaModel, input_ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """The logits of ``model`` with the blocks in ``skip`` bypassed, written out by hand."""
    seq = input_ids.shape[1]
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    x = model.embed_tokens(input_ids)
    for index, block in enumerate(model.layers):
        if index not in skip:
            x = block(x, cos, sin)
    return model.lm_head(model.norm(x))


@torch.no_grad()
def test_removal_equals_skipping_blocks_by_hand():
    model = tiny_model()
    data = tokens()
    expected = skipping_forward(model, data, {1, 3})
    pruned = remove_blocks(model, [3, 1])
    assert pruned is model
    assert pruned.config.n_layer == 3 and len(pruned.layers) == 3
    torch.testing.assert_close(pruned(data), expected, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("quant", ["bf16", "quest_w4"])
def test_kv_cache_after_removal_matches_full_forward(quant):
    # d_model 128 so the Hadamard block of the quantized recipe divides every in_features.
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(n_layer=4, d_model=128, n_head=4, vocab_size=64, max_seq_len=32,
                                   mlp_hidden=128)).eval()
    if quant != "bf16":
        convert(model, load_recipe(quant))
    remove_blocks(model, [0, 2])
    if quant != "bf16":
        assert model.layers[1].self_attn.q_proj.layer_name == "layers.1.self_attn.q_proj"
    data = tokens(n_seq=2, seq=10)
    full = model(data)
    cache = model.make_cache()
    assert cache.n_layer == 2
    steps = [model(data[:, :4], cache=cache)] + [model(data[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
