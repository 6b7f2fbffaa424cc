"""FrozenQuantLinear: the forward of its codes and steps (with a mask), and the inference cache that must follow every
in-place change of them."""

from __future__ import annotations

import torch

from bitlaw.kernels.quantizers import dequantize, unrotate
from bitlaw.kernels.recipe import load_recipe
from bitlaw.models.frozen_linear import FrozenQuantLinear
from bitlaw.models.quant_linear import QuantLinear


def frozen(quant: str = "quest_w2", masked: bool = True) -> FrozenQuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(256, 8, recipe=load_recipe(quant))
    result = FrozenQuantLinear.from_quant_linear(layer)
    if masked:
        result.mask = torch.rand(8, 256, generator=torch.Generator().manual_seed(1)) > 0.5
    return result


def test_the_forward_multiplies_by_the_masked_dequantized_codes_rotated_back():
    layer = frozen()
    x = torch.randn(5, 256)
    values = dequantize(layer.codes, layer.step.detach(), layer.recipe.weight.fmt) * layer.mask
    expected = x @ unrotate(values, layer.recipe.weight).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert bool((layer.values()[~layer.mask] == 0).all())


def test_the_inference_cache_is_bitwise_the_training_forward_and_follows_in_place_changes():
    layer = frozen("quest_w4a4")
    x = torch.randn(5, 256)

    def cached_and_uncached() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cached = layer(x)
        return cached, layer(x).detach()  # grad enabled: computed from the codes, no cache

    outputs = []
    for change in (lambda: None, lambda: layer.step.mul_(2), lambda: layer.codes.neg_(),
                   lambda: layer.mask.fill_(False)):
        with torch.no_grad():
            change()  # in place, as an optimizer step, a V-step or load_state_dict writes
        cached, uncached = cached_and_uncached()
        assert torch.equal(cached, uncached)
        outputs.append(cached)
    assert all(not torch.equal(a, b) for a, b in zip(outputs, outputs[1:], strict=False))
    assert torch.equal(outputs[-1], torch.zeros_like(outputs[-1]))
