"""One quantization per shared input: q/k/v and gate/up of a quantized Llama block share their input's codes.

A counter on the fast path's quantizer shows four activation quantizations per block forward, not seven; the
grouped block computes what seven separate layers compute (forward and every gradient), on either backend.
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.recipe import load_recipe
from bitlaw.kernels.triton.common import INTERPRETED
from bitlaw.models import llama
from bitlaw.models.convert import convert, quantized_layers
from bitlaw.models.llama import LlamaBlock, LlamaConfig, LlamaModel, rope_tables

DEVICE = "cpu" if INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
CONFIG = LlamaConfig(n_layer=1, d_model=128, n_head=2, mlp_hidden=256, vocab_size=64, max_seq_len=16)


def _block(recipe: str, backend: str) -> LlamaBlock:
    torch.manual_seed(0)
    model = LlamaModel(CONFIG)
    convert(model, load_recipe(recipe))
    block = model.layers[0]
    for layer in quantized_layers(block).values():
        layer.backend = backend
    return block.to(DEVICE)


def _run(block: LlamaBlock, seed: int = 1) -> list[torch.Tensor]:
    """Output and every parameter gradient (and the input's) of one forward + backward at [2, 16, 128]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 128, generator=gen).to(DEVICE).requires_grad_()
    cos, sin = (t.to(DEVICE) for t in rope_tables(CONFIG.head_dim, 16, CONFIG.rope_theta))
    block.zero_grad()
    y = block(x, cos, sin)
    y.backward(torch.randn(y.shape, generator=gen).to(DEVICE))
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()]


@needs_triton
def test_a_block_forward_quantizes_four_activations_not_seven(monkeypatch):
    from bitlaw.kernels.triton import ops

    counts = {"activations": 0, "weights": 0}
    quantize_rows, quantize_row_groups = ops.quantize_rows, ops.quantize_row_groups

    def count(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ops, "quantize_rows", count("activations", quantize_rows))
    monkeypatch.setattr(ops, "quantize_row_groups", count("weights", quantize_row_groups))
    block = _block("quest_w4a4", "triton")
    _run(block)
    assert counts == {"activations": 4, "weights": 4}
    assert {layer.last_backend.backend for layer in quantized_layers(block).values()} == {"triton"}


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "reference"])
@pytest.mark.parametrize("recipe", ["quest_w4a4", "quest_w2a2"])
def test_the_grouped_block_equals_seven_separate_layers(monkeypatch, recipe, backend):
    grouped = _run(_block(recipe, backend))
    monkeypatch.setattr(llama, "shared_input_projections", lambda x, layers: [layer(x) for layer in layers])
    separate = _run(_block(recipe, backend))
    for got, want in zip(grouped, separate, strict=True):
        # Equal up to the order of fp32 sums: g_x sums the three products before its mask and rotation.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_layers_that_cannot_share_run_one_by_one(monkeypatch):
    calls: list[int] = []
    original = llama.shared_input_projections.__globals__["quantized_linear_group"]

    def spy(x, weights, *args, **kwargs):
        calls.append(len(weights))
        return original(x, weights, *args, **kwargs)

    monkeypatch.setitem(llama.shared_input_projections.__globals__, "quantized_linear_group", spy)
    _run(_block("quest_w4a4", "reference"))
    assert calls == [3, 2]
    calls.clear()
    _run(_block("lsq_w4a4", "reference"))  # learned scales belong to one layer
    block = _block("quest_w4a4", "reference")
    block.self_attn.k_proj.register_forward_hook(lambda *args: None)  # a hook expects k_proj's own call
    _run(block)
    assert calls == [2]
    calls.clear()
    block = _block("quest_w4a4", "reference")
    block.mlp.up_proj.track_stats = True  # its own weight's masked fraction, on the steps that log it
    _run(block)
    assert calls == [3] and set(block.mlp.up_proj.stats) == {"weight_masked_fraction", "input_masked_fraction"}


@needs_triton
def test_a_quantized_block_compiles_in_one_graph_with_eager_numerics():
    """``compile: true`` (train config) compiles the model: a quantized block on the fast path is one graph (the
    quantized linear is a torch.library operator, the grouping plain Python) and computes what eager does."""
    block = _block("quest_w4a4", "triton")
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(CONFIG.head_dim, 16, CONFIG.rope_theta))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager = _run(block)
    torch._dynamo.reset()
    block.forward = torch.compile(block.forward, backend="aot_eager", fullgraph=True)
    compiled = _run(block)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
