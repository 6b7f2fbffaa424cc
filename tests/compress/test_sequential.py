"""The sequential GPTQ/SparseGPT pass over a whole model (bitlaw.compress.sequential, docs/compress.md §2): exact
per-row sparsity, each layer swept on the inputs of the already compressed layers before it, the dequantized weight
written, a scheduler's per-layer sparsities accepted, no hook left behind, and bad input refused before any change."""

from __future__ import annotations

import copy

import pytest
import torch

from bitlaw.compress.obs import HessianAccumulator, compress_layer
from bitlaw.compress.scheduler import schedule, weighted_mean
from bitlaw.compress.sequential import PROJECTIONS, compress_model, layer_losses
from bitlaw.kernels.recipe import Recipe, TensorSpec
from bitlaw.kernels.sparsity import kept_count, magnitude_keep
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel

VOCAB, SEQUENCES, LENGTH = 96, 12, 16
INT3 = TensorSpec(format="int3", rotation="none")


def tiny_model(seed: int = 0) -> LlamaModel:
    """Two blocks, d_model 64, hidden 128, eval mode. The embeddings are nearly rank 8, so the blocks' inputs are
    strongly correlated: the regime where the OBS update has something to compensate with."""
    gen = torch.Generator().manual_seed(seed)
    model = LlamaModel(LlamaConfig(n_layer=2, d_model=64, n_head=4, vocab_size=VOCAB, max_seq_len=32,
                                   mlp_hidden=128, init_std=0.2))
    model.init_weights(gen)
    with torch.no_grad():
        low_rank = torch.randn(VOCAB, 8, generator=gen) @ torch.randn(8, 64, generator=gen)
        model.embed_tokens.weight.copy_(0.3 * low_rank + 0.02 * torch.randn(VOCAB, 64, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The matmuls here are tiny: intra-op threads only add synchronisation, which on a busy machine costs more
    than the work (measured: 20x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(1))


def projections(model: LlamaModel) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if name.endswith(PROJECTIONS)}


def inputs_hessian(model: LlamaModel, name: str, calibration: torch.Tensor) -> HessianAccumulator:
    """H of the inputs ``name`` receives when ``model`` runs on the whole calibration batch at once."""
    accumulator = HessianAccumulator(model.get_submodule(name).in_features)
    handle = model.get_submodule(name).register_forward_hook(lambda _m, args, _out: accumulator.add(args[0]))
    with torch.no_grad():
        model(calibration)
    handle.remove()
    return accumulator


def test_realised_sparsity_is_exact_per_row_and_the_model_still_runs(calibration):
    model = tiny_model()
    summaries = compress_model(model, calibration, sparsity=0.5, chunk_size=5)
    layers = projections(model)
    assert list(summaries) == [f"layers.{i}.{name}" for i in range(2) for name in PROJECTIONS]
    for name, module in layers.items():
        out_features, in_features = module.weight.shape
        zeros = (module.weight == 0).sum(dim=1)
        assert (zeros == in_features - kept_count(in_features, 0.5)).all(), name
        assert summaries[name].sparsity == pytest.approx(float((module.weight == 0).double().mean()), abs=1e-12)
        assert summaries[name].params == out_features * in_features
        assert summaries[name].rows == SEQUENCES * LENGTH
        assert summaries[name].loss > 0
    with torch.no_grad():
        assert torch.isfinite(model(calibration)).all()


def test_each_layer_is_swept_on_the_inputs_of_the_compressed_layers_before_it(calibration):
    # With one chunk the pass sees exactly the activations of the final model's forward, so re-sweeping a dense
    # weight on the inputs it receives in the *compressed* model reproduces what the pass wrote; the inputs of the
    # dense model give another weight.
    dense = tiny_model()
    model = copy.deepcopy(dense)
    compress_model(model, calibration, sparsity=0.5, chunk_size=SEQUENCES)
    for name in ("layers.0.self_attn.o_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.v_proj"):
        weight = dense.get_submodule(name).weight
        written = model.get_submodule(name).weight
        sequential = compress_layer(weight, inputs_hessian(model, name, calibration).hessian, sparsity=0.5)
        torch.testing.assert_close(written, sequential.weight)
        parallel = compress_layer(weight, inputs_hessian(dense, name, calibration).hessian, sparsity=0.5)
        assert not torch.equal(written, parallel.weight)


def test_sequential_pass_beats_magnitude_pruning(calibration):
    # A random model's LM loss sits near log(vocab) whatever is pruned, so the comparison is on its output: the
    # mean squared logit error against the dense model on the calibration tokens.
    dense = tiny_model()
    with torch.no_grad():
        reference = dense(calibration)
    pruned = copy.deepcopy(dense)
    compress_model(pruned, calibration, sparsity=0.5, chunk_size=SEQUENCES)
    magnitude = copy.deepcopy(dense)
    with torch.no_grad():
        for module in projections(magnitude).values():
            module.weight.mul_(magnitude_keep(module.weight, "row", 0.5))
        sequential_error = (pruned(calibration) - reference).square().mean()
        magnitude_error = (magnitude(calibration) - reference).square().mean()
    assert sequential_error < 0.7 * magnitude_error


def test_zero_sparsity_without_spec_leaves_the_model_bitwise(calibration):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    summaries = compress_model(model, calibration)
    assert all(s.sparsity == 0 and s.loss == 0 for s in summaries.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_spec_writes_the_dequantized_weight(calibration):
    # q/k/v of block 0 read the normalised embeddings, which compression does not change: the pass must write
    # exactly compress_layer's weight for their Hessian, on the int3 grid (at most 8 levels per row).
    dense = tiny_model()
    model = copy.deepcopy(dense)
    summaries = compress_model(model, calibration, spec=INT3, chunk_size=SEQUENCES)
    name = "layers.0.self_attn.k_proj"
    expected = compress_layer(dense.get_submodule(name).weight,
                              inputs_hessian(dense, name, calibration).hessian, spec=INT3)
    assert torch.equal(model.get_submodule(name).weight, expected.weight)
    assert summaries[name].loss == pytest.approx(expected.loss, rel=1e-12)
    for module in projections(model).values():
        assert max(len(torch.unique(row)) for row in module.weight) <= 8


def test_scheduled_per_layer_sparsities_are_accepted(calibration):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    losses = layer_losses(model, calibration, 0.5, chunk_size=7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    sizes = {name: module.weight.numel() for name, module in projections(model).items()}
    assert list(losses) == list(sizes) and all(loss > 0 for loss in losses.values())
    sparsities = schedule(losses, sizes, 0.5)
    assert weighted_mean(sparsities, sizes) == pytest.approx(0.5, abs=1e-6)
    assert len({round(s, 9) for s in sparsities.values()}) > 1  # the allocation is not uniform

    summaries = compress_model(model, calibration, sparsity=sparsities, chunk_size=7)
    for name, module in projections(model).items():
        in_features = module.weight.shape[1]
        zeros = (module.weight == 0).sum(dim=1)
        assert (zeros == in_features - kept_count(in_features, sparsities[name])).all(), name
    # Each layer rounds its count per row to the nearest integer: at most half an entry per row off.
    realised = weighted_mean({name: s.sparsity for name, s in summaries.items()}, sizes)
    assert realised == pytest.approx(0.5, abs=max(0.5 / m.weight.shape[1] for m in projections(model).values()))


def test_no_hook_is_left_and_the_mode_is_restored(calibration):
    model = tiny_model().train()
    layer_losses(model, calibration, 0.5)
    compress_model(model, calibration, sparsity=0.3, layer_filter=("mlp.down_proj",))
    assert model.training
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


def quantized_model() -> LlamaModel:
    return convert(tiny_model(), Recipe(name="w4", weight=TensorSpec(format="int4", rotation="none")))


@pytest.mark.parametrize(("make", "calib", "kwargs", "match"), [
    (tiny_model, torch.rand(4, 8), {}, r"2-D integer tensor"),
    (tiny_model, torch.zeros(8, dtype=torch.long), {}, r"2-D integer tensor"),
    (tiny_model, torch.zeros(0, 8, dtype=torch.long), {}, r"S >= 1"),
    (tiny_model, torch.zeros(2, 33, dtype=torch.long), {}, r"max_seq_len=32"),
    (tiny_model, torch.full((2, 8), VOCAB), {}, r"\[0, 96\)"),
    (tiny_model, torch.full((2, 8), -1), {}, r"\[0, 96\)"),
    (tiny_model, None, {"sparsity": {"layers.9.mlp.down_proj": 0.5}}, r"unknown layers \['layers.9"),
    (tiny_model, None, {"sparsity": {"layers.0.mlp.down_proj": 0.5}}, r"misses layers \['layers.0.mlp.gate"),
    (tiny_model, None, {"sparsity": 0.5, "nm": (2, 4)}, r"one of the two"),
    (tiny_model, None, {"sparsity": 1.5}, r"sparsity=1.5"),
    (tiny_model, None, {"layer_filter": ("lm_head",)}, r"layer_filter"),
    (quantized_model, None, {"sparsity": 0.5}, r"'layers.0.self_attn.q_proj'.*frozen quantized layer"),
], ids=["float", "1-D", "no-sequence", "too-long", "id-too-large", "negative-id", "unknown-layer",
        "missing-layer", "nm-and-sparsity", "bad-sparsity", "bad-filter", "quantlinear"])
def test_bad_input_raises_before_the_model_changes(calibration, make, calib, kwargs, match):
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        compress_model(model, calibration if calib is None else calib, **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
