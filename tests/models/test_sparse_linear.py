"""The quantized linear layer with sparse weights: RigL's persistent mask moves only on its update steps and
resumes from a state dict, the cubic schedule follows the trainer's progress, convert treats sparse bf16 as
compressed, and the fallback from Triton is recorded with its reason."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe
from bitlaw.models.convert import convert, quantized_layers
from bitlaw.models.quant_linear import QuantLinear


def _layer(spec: TensorSpec, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(32, 6), Recipe(name="t", weight=spec))


def _step(layer: QuantLinear, step: int, total: int, seed: int) -> None:
    """One training step as LitLlama drives it: progress, forward, backward, (no optimizer), update."""
    layer.set_progress(step, total)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed))
    layer(x).square().sum().backward()
    layer.update_sparsity()


def test_rigl_mask_moves_only_on_update_steps_keeping_counts_and_zeroing_grown():
    spec = TensorSpec(format="bf16", sparsity=0.5, sparse_rule="rigl", update_every=3, drop_fraction=0.5)
    layer = _layer(spec)
    assert not layer.rigl_initialized
    layer(torch.randn(1, 32))  # the first forward initialises the mask: the top half of each row by magnitude
    assert layer.rigl_initialized
    lower_median = layer.weight.abs().median(-1, keepdim=True).values  # the 17th largest of 32
    assert torch.equal(layer.rigl_mask, layer.weight.abs() > lower_median)
    total = 8  # updates after steps 0 and 3 (6 is past rigl_stop · 8 = 6)
    masks, weights = [], []
    for step in range(total):
        before = layer.rigl_mask.clone()
        _step(layer, step, total, seed=step)
        masks.append((before, layer.rigl_mask.clone()))
        weights.append(layer.weight.detach().clone())
    for step, (before, after) in enumerate(masks):
        assert (after.sum(-1) == 16).all()
        changed = not torch.equal(before, after)
        assert changed == (step in (0, 3)), step
        if changed:
            grown = after & ~before
            dropped = before & ~after
            drop = math.floor(0.5 / 2 * (1 + math.cos(math.pi * step / 6)) * 16 + 0.5)
            assert (dropped.sum(-1) <= drop).all() and grown.sum() == dropped.sum() > 0
            assert (weights[step][grown] == 0).all()
    # In the forward the mask is the survivors, and pruned weights get no gradient.
    layer.weight.grad = None
    out = layer(torch.randn(3, 32))
    out.sum().backward()
    assert torch.equal(layer.weight.grad != 0, layer.rigl_mask)


def test_rigl_state_is_saved_and_restored():
    spec = load_recipe("rigl50").weight
    layer = _layer(spec)
    layer(torch.randn(2, 32))
    state = layer.state_dict()
    assert {"rigl_mask", "rigl_initialized"} <= set(state) and "progress" not in state
    other = _layer(spec, seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.rigl_mask, layer.rigl_mask) and other.rigl_initialized
    torch.testing.assert_close(other(torch.ones(2, 32)), layer(torch.ones(2, 32)), rtol=0, atol=0)


def test_cubic_schedule_follows_the_progress_and_ends_at_the_final_sparsity():
    spec = TensorSpec(format="bf16", sparsity=0.75, schedule="cubic", ramp=0.5)
    layer = _layer(spec)
    for step, expected in [(0, 0.0), (5, 0.75 * (1 - 0.5**3)), (10, 0.75)]:
        layer.set_progress(step, 20)
        zeros = (layer.quantized_weight().values == 0).sum(-1)
        assert (zeros == math.floor(expected * 32 + 0.5)).all(), step
    fresh = _layer(spec)  # never trained: outside training the final sparsity applies
    assert ((fresh.quantized_weight().values == 0).sum(-1) == 24).all()


def test_rigl_with_cubic_schedule_prunes_to_the_next_target():
    spec = TensorSpec(format="bf16", sparsity=0.5, schedule="cubic", sparse_rule="rigl", update_every=100)
    layer = _layer(spec)
    for step in range(3):
        _step(layer, step, 4, seed=step)
        target = 0.5 * (1 - (1 - min((step + 1) / 2, 1)) ** 3)
        assert (layer.rigl_mask.sum(-1) == 32 - math.floor(target * 32 + 0.5)).all(), step


def test_convert_swaps_layers_for_sparse_bf16_and_checks_widths():
    model = nn.Sequential()
    model.add_module("layers", nn.ModuleList([nn.Linear(48, 48)]))
    convert(model, load_recipe("sparse_2of4"), r"layers\.\d+")
    assert list(quantized_layers(model)) == ["layers.0"]
    with pytest.raises(ValueError, match=r"layers\.0 .*weight\).*group=32 does not divide in_features=48"):
        convert(model, Recipe(name="g32", weight=TensorSpec(format="int4", rotation="none", group=32)), r"layers\.\d+")


def test_the_fallback_from_triton_is_recorded_with_its_reason():
    layer = _layer(load_recipe("sparse50_magnitude").weight)
    layer.backend = "triton"
    layer(torch.randn(2, 32))
    assert layer.last_backend.backend == "reference"
    assert "weight: sparsity 0.5 (structure row, rule magnitude) runs only on the reference path" in \
        layer.last_backend.reason
