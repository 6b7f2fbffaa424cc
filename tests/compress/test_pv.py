"""PV-tuning: P-steps keep the codes, V-steps move at most ⌈τ·n⌉ of them towards the rounded target, tuning helps."""

from __future__ import annotations

import math

import pytest
import torch

from bitlaw.compress.pv import PVTuner, lm_loss, to_pv, v_update
from bitlaw.kernels.quantizers import dequantize
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.convert import convert
from bitlaw.models.frozen_linear import FrozenQuantLinear
from bitlaw.models.llama import LlamaConfig, LlamaModel

VOCAB = 64


def quantized_model(quant: str = "quest_w2", seed: int = 0) -> LlamaModel:
    # d_model and the MLP width 128 so the Hadamard block of the presets divides every in_features.
    torch.manual_seed(seed)
    model = LlamaModel(LlamaConfig(n_layer=2, d_model=128, n_head=4, vocab_size=VOCAB, max_seq_len=32,
                                   mlp_hidden=128))
    return convert(model, load_recipe(quant))


def batch(seed: int, rows: int = 4, seq: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def all_codes_of(fmt) -> list[int]:
    """Every code of ``fmt`` as QuantResult defines them: odd integers for int{b}, level indices otherwise."""
    if fmt.kind == "int":
        return list(range(-(2**fmt.bits) + 1, 2**fmt.bits, 2))
    return list(range(len(fmt.levels)))


def codes_of(layers: list[FrozenQuantLinear]) -> list[torch.Tensor]:
    return [layer.codes.clone() for layer in layers]


@pytest.mark.parametrize("quant", ["quest_w2", "quest_w4z", "quest_fp4", "quest_w2_rotated"])
@torch.no_grad()
def test_to_pv_keeps_the_forward_bitwise(quant):
    model = quantized_model(quant).eval()
    data = batch(1)
    expected = model(data)
    layers = to_pv(model)
    assert len(layers) == 2 * 7 and all(layer.codes.dtype == torch.int16 for layer in layers)
    torch.testing.assert_close(model(data), expected, rtol=0, atol=0)


@torch.no_grad()
def test_dense_weight_is_the_weight_the_layer_multiplies_by():
    layer = to_pv(quantized_model("quest_w2"))[0]
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t(), rtol=1e-5, atol=1e-5)


def test_to_pv_refuses_a_model_without_quantized_layers():
    model = LlamaModel(LlamaConfig(n_layer=1, d_model=32, n_head=2, vocab_size=VOCAB, max_seq_len=8))
    with pytest.raises(ValueError, match="no QuantLinear"):
        to_pv(model)


def test_p_step_keeps_codes_and_moves_scales():
    model = quantized_model()
    layers = to_pv(model)
    codes, scales = codes_of(layers), [layer.step.detach().clone() for layer in layers]
    PVTuner(model, layers, lr_scale=1e-2).p_step(batch(1))
    assert all(torch.equal(layer.codes, c) for layer, c in zip(layers, codes, strict=True))
    assert all(not torch.equal(layer.step, s) for layer, s in zip(layers, scales, strict=True))


@pytest.mark.parametrize("tau", [0.001, 0.01, 0.2])
def test_v_step_changes_at_most_tau_n_codes_per_matrix(tau):
    model = quantized_model()
    layers = to_pv(model)
    before = codes_of(layers)
    scales = [layer.step.detach().clone() for layer in layers]
    # A step size large enough that the plain rounding of the target would move far more than τ·n codes.
    PVTuner(model, layers, lr_v=50.0, tau=tau).v_step(batch(1))
    changed = [int((layer.codes != c).sum()) for layer, c in zip(layers, before, strict=True)]
    assert all(n <= math.ceil(tau * layer.codes.numel()) for n, layer in zip(changed, layers, strict=True))
    assert sum(changed) > 0
    assert max(n - math.ceil(tau * layer.codes.numel()) for n, layer in zip(changed, layers, strict=True)) == 0
    assert all(torch.equal(layer.step, s) for layer, s in zip(layers, scales, strict=True))


@pytest.mark.parametrize("quant", ["quest_w2", "quest_w4z", "quest_fp4"])
def test_v_update_with_tau_one_is_round_to_nearest_and_stays_on_the_grid(quant):
    layer = to_pv(quantized_model(quant))[3]
    fmt = layer.recipe.weight.fmt
    # Far beyond the grid's range in places, so clamping to the end levels is exercised.
    target = layer.values().detach() + 3 * torch.randn(layer.codes.shape) * layer.step.detach()
    # Nearest level by exhaustive search over every code of the format.
    all_codes = torch.tensor(all_codes_of(fmt), dtype=torch.int16)
    levels = dequantize(all_codes.expand(layer.step.shape[0], -1), layer.step.detach(), fmt)  # [out, levels]
    expected = all_codes[(target[:, :, None] - levels[:, None, :]).abs().argmin(dim=-1)]
    v_update(layer, target, 1.0)
    assert torch.equal(layer.codes, expected)
    codes = layer.codes.int()
    if fmt.kind == "int":
        assert bool(((codes % 2 == 1) & (codes.abs() <= 2**fmt.bits - 1)).all())
    else:
        assert int(codes.min()) >= 0 and int(codes.max()) < len(fmt.levels)
    assert codes.min() != codes.max()


def test_v_update_applies_the_largest_improvements_first():
    layer = to_pv(quantized_model())[0]
    values = layer.values().detach()
    target = values.clone()
    step = layer.step.detach()[0, 0]  # int2: levels ±step/2, ±3·step/2
    # Three entries pushed to the next level by growing amounts; with a budget of two the smaller one stays.
    for column, push in ((0, 0.9), (1, 1.0), (2, 0.8)):
        target[0, column] = values[0, column] + push * step * (1 if values[0, column] < 0 else -1)
    before = layer.codes.clone()
    v_update(layer, target, 1.5 / layer.codes.numel())  # ⌈1.5⌉ = 2 codes
    moved = (layer.codes != before).nonzero().tolist()
    assert moved == [[0, 0], [0, 1]]


def value_grads(model: LlamaModel, layers: list[FrozenQuantLinear], data: torch.Tensor) -> list[torch.Tensor]:
    for layer in layers:
        layer.capture_grad = True
    lm_loss(model, data).backward()
    grads = []
    for layer in layers:
        layer.capture_grad = False
        grads.append(layer.captured_values.grad.clone())
        layer.captured_values = None
    model.zero_grad(set_to_none=True)
    return grads


def test_ste_target_persists_across_v_steps():
    model = quantized_model()
    layers = to_pv(model)
    lr_v = 0.05
    tuner = PVTuner(model, layers, lr_v=lr_v, tau=1.0, ste=True)
    start = [t.clone() for t in tuner.targets]
    torch.testing.assert_close(start[0], layers[0].values().detach(), rtol=0, atol=0)
    data = batch(1)
    moved = [t.clone() for t in start]
    for _ in range(2):
        grads = value_grads(model, layers, data)
        moved = [t - lr_v * g for t, g in zip(moved, grads, strict=True)]
        tuner.v_step(data)
        for target, expected in zip(tuner.targets, moved, strict=True):
            torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-7)
    # With τ = 1 the codes are the rounding of the accumulated target, not of one step from the current values.
    for layer, target in zip(layers, tuner.targets, strict=True):
        assert torch.equal(layer.codes, layer.round_codes(target)[0])


def test_pv_tuning_lowers_the_training_loss():
    model = quantized_model()
    layers = to_pv(model)
    train = [batch(1)]
    tuner = PVTuner(model, layers, lr_scale=1e-2, lr_norm=1e-2, lr_embed=1e-2, lr_v=1.0, tau=0.01)
    start = tuner.evaluate(train)
    before = codes_of(layers)
    history = tuner.tune(train, train, steps=6, mode="pv")
    assert tuner.evaluate(train) < start - 0.05
    assert history["best_step"] > 0
    assert any(not torch.equal(layer.codes, c) for layer, c in zip(layers, before, strict=True))


def test_tune_keeps_the_best_state_on_validation():
    model = quantized_model()
    layers = to_pv(model)
    train, val = [batch(1)], [batch(2)]
    # Learning rates so large that memorising the training batch soon ruins the validation loss.
    tuner = PVTuner(model, layers, lr_scale=0.3, lr_norm=0.3, lr_embed=0.3, lr_v=5.0, tau=0.05)
    history = tuner.tune(train, val, steps=5, mode="pv")
    assert len(history["val_loss"]) == 6 and len(history["train_loss"]) == 5
    assert history["val_steps"] == list(range(6))
    best = history["best_step"]
    assert history["val_loss"][best] == min(history["val_loss"])
    assert history["val_loss"][-1] > min(history["val_loss"])  # the last state is not the best one here
    assert tuner.evaluate(val) == history["val_loss"][best]


def test_tuner_refuses_bad_arguments():
    model = quantized_model()
    layers = to_pv(model)
    with pytest.raises(ValueError, match="tau=1.5"):
        PVTuner(model, layers, tau=1.5)
    with pytest.raises(ValueError, match="mode='x'"):
        PVTuner(model, layers).tune([batch(1)], [batch(2)], steps=1, mode="x")
