"""The quantized backward's reference (bitlaw.kernels.gradients): recipe fields, rounding (nearest exact on the grid,
stochastic unbiased with the analytic variance), the two GEMMs against QuEST's backward, and the random bits (seeded,
reproducible, independent per rank, layer and micro-batch)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bitlaw.kernels.gradients import (
    GRIDS,
    grid_spacing,
    layer_seed,
    noise_context,
    quantize_operand,
    round_scaled,
    set_noise_context,
    uniform_pair,
)
from bitlaw.kernels.quantizers import reference_linear
from bitlaw.kernels.recipe import GradSpec, Recipe, load_recipe
from bitlaw.models.quant_linear import QuantLinear
from bitlaw.train.module import noise_index

FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2")


def test_defaults_keep_every_recipe_quest():
    quest = load_recipe("quest_w4a4")
    assert not quest.quantized_backward and not quest.grad_input.quantized and not quest.grad_weight.quantized
    assert "grad_input" not in quest.to_dict() and "grad_weight" not in quest.to_dict()


def test_presets_and_round_trip():
    g8, g8g8 = load_recipe("quest_w4a4_g8"), load_recipe("quest_w4a4_g8g8")
    assert g8.grad_input == GradSpec("fp8_e4m3", "stochastic", "token") and not g8.grad_weight.quantized
    assert g8g8.grad_weight == GradSpec("fp8_e4m3", "stochastic", "channel")
    int8 = load_recipe("quest_w4a4_g8g8_int8")
    assert int8.grad_input == int8.grad_weight == GradSpec("int8", "stochastic", "block")
    for recipe in (g8, g8g8, int8):
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        assert recipe.weight == load_recipe("quest_w4a4").weight and recipe.input == load_recipe("quest_w4a4").input


@pytest.mark.parametrize(("data", "message"), [
    ({"format": "int4"}, "format='int4' is not allowed; allowed: bf16, int8, fp8_e4m3, fp8_e5m2"),
    ({"format": "int8", "rounding": "up"}, "rounding='up' is not allowed; allowed: nearest, stochastic"),
    ({"format": "int8", "scale": "row"}, "scale='row' is not allowed; allowed: token, channel, block"),
    ({"format": "int8", "block": 100}, "block=100 is not allowed; allowed: a power of two"),
    ({"format": "int8", "hadamard": "yes"}, "hadamard='yes' is not allowed; allowed: true, false"),
    ({"rounding": "stochastic"}, "rounding='stochastic' is only allowed with a quantized gradient format"),
    ({"format": "int8", "seed": 1}, "unknown field(s) ['seed']"),
])
def test_bad_grad_spec_is_refused_with_what_is_allowed(data, message):
    recipe = load_recipe("quest_w4a4").to_dict()
    with pytest.raises(ValueError, match="grad_input") as info:
        Recipe.from_dict({**recipe, "grad_input": data})
    assert message in str(info.value)


def test_quantized_backward_needs_a_quantized_layer():
    with pytest.raises(ValueError, match="grad_weight.format='int8' needs a quantized weight"):
        Recipe(grad_weight=GradSpec("int8"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_nearest_is_exact_on_grid_values(fmt):
    grid = GRIDS[fmt]
    # Every grid value of the format from the smallest subnormal up (int8: the integers), both signs, one row.
    if grid.min_exponent is None:
        levels = torch.arange(-127, 128, dtype=torch.float32)
    else:
        positive = torch.tensor([m * 2.0 ** (e - grid.mantissa_bits)
                                 for e in range(grid.min_exponent, int(math.log2(grid.largest)) + 1)
                                 for m in range(2**grid.mantissa_bits, 2 ** (grid.mantissa_bits + 1))])
        positive = torch.cat([torch.tensor([2.0 ** (grid.min_exponent - grid.mantissa_bits) * m
                                            for m in range(1, 2**grid.mantissa_bits)]), positive])
        positive = positive[positive <= grid.largest]
        levels = torch.cat([-positive, torch.zeros(1), positive])
    # The row's absmax maps onto the grid's largest value; a power-of-two step keeps the scaled grid exact in fp32.
    row = (levels * 2.0**-9)[None, :]
    spec = GradSpec(fmt, "nearest", "token")
    assert torch.equal(quantize_operand(row, spec, "row"), row)  # exact: every value is on the scaled grid
    noise = uniform_pair(3, *row.shape)[0]
    assert torch.equal(quantize_operand(row, GradSpec(fmt, "stochastic", "token"), "row", noise), row)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nearest_picks_the_nearer_neighbour(fmt):
    grid = GRIDS[fmt]
    v = torch.randn(4, 512) * 20
    v[:, 0] = grid.largest  # each row's absmax is the grid's largest value: the scale is exactly 1
    out = quantize_operand(v, GradSpec(fmt, "nearest", "token"), "row")
    spacing = grid_spacing(v, grid)
    assert torch.all((out - v).abs() <= spacing / 2)


def test_int8_rounding_is_clamped_from_above_only():
    # Scaled values a few ulps past ±127 (the float rounding of a scale and its reciprocal): a stochastic floor of
    # one just below -127 reaches -128, which int8 holds and which keeps it unbiased; above 127 it is capped.
    grid = GRIDS["int8"]
    ulp = 2.0**-17  # the fp32 spacing at 127
    v = torch.tensor([127 + 2 * ulp, -127 - 2 * ulp, -127 - 2 * ulp, 127.0, -127.0])
    lowest, highest = 2.0**-17, 1 - 2.0**-17  # the extreme values of ξ = (k + ½)/2^16
    xi = torch.tensor([highest, lowest, highest, highest, lowest])
    assert round_scaled(v, grid, xi).tolist() == [127, -128, -127, 127, -127]
    assert round_scaled(v, grid, None).tolist() == [127, -127, -127, 127, -127]  # nearest stays within ±127


def _replicated(fmt: str, rows: int, rounding: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of values repeated ``rows`` times (each row's absmax = the grid's largest value: scale 1) and its
    quantization: every row is an independent draw of the same quantizer."""
    gen = torch.Generator().manual_seed(seed)
    grid = GRIDS[fmt]
    v = torch.randn(1, 256, generator=gen) * grid.largest / 6
    v[0, 0] = grid.largest
    v = v.clamp(-grid.largest, grid.largest)
    data = v.repeat(rows, 1)
    return v[0], data, quantize_operand(data, GradSpec(fmt, rounding, "token"), "row", uniform_pair(seed, rows, 256)[0])


def _neighbours(v: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid spacing at each entry of ``v`` and the grid value just below it."""
    spacing = grid_spacing(v, grid)
    return spacing, torch.floor(v / spacing) * spacing


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased_at_the_rate_of_its_standard_error(fmt):
    grid = GRIDS[fmt]
    v, _, draws = _replicated(fmt, 4096, "stochastic", seed=11)
    spacing, below = _neighbours(v, grid)
    assert torch.all((draws == below) | (draws == below + spacing))  # only the two neighbours
    variance = (v - below) * (below + spacing - v)
    for n in (256, 4096):
        error = draws[:n].mean(dim=0) - v
        se = (variance / n).sqrt()
        informative = variance > 0
        z = error[informative] / se[informative]
        # The means' errors are standard errors in size: z ~ N(0, 1) over the 255 entries.
        assert z.abs().max() < 5 and abs(float(z.mean())) < 0.3 and 0.8 < float(z.square().mean()) < 1.25
    # Nearest rounding has a fixed error that more draws cannot remove; stochastic rounding's shrinks as 1/sqrt(n).
    assert float((draws.mean(0) - v).abs().mean()) < float((quantize_operand(
        v[None], GradSpec(fmt, "nearest", "token"), "row")[0] - v).abs().mean()) / 10


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_variance_matches_the_analytic_value(fmt):
    grid = GRIDS[fmt]
    v, _, draws = _replicated(fmt, 4096, "stochastic", seed=5)
    spacing, below = _neighbours(v, grid)
    p = (v - below) / spacing  # the probability of rounding up
    analytic = spacing**2 * p * (1 - p)
    empirical = draws.var(dim=0)
    keep = p * (1 - p) > 0.01
    # The sample variance's own standard error for a two-point variable: sqrt((μ4 − σ⁴(n−3)/(n−1))/n) with the
    # fourth central moment μ4 = Δ⁴ p(1−p)(1 − 3p(1−p)) and σ² = Δ² p(1−p).
    q, n = p * (1 - p), draws.shape[0]
    se = spacing**2 * ((q * (1 - 3 * q) - q**2 * (n - 3) / (n - 1)) / n).sqrt()
    z = (empirical[keep] - analytic[keep]) / se[keep]
    assert z.abs().max() < 5 and 0.7 < float(z.square().mean()) < 1.4
    assert abs(float(empirical[keep].sum() / analytic[keep].sum()) - 1) < 0.02


def test_block_and_column_scales_and_hadamard():
    torch.manual_seed(0)
    t = torch.randn(96, 300)  # a reduced dimension that is not a multiple of the block: zero-padded
    t[:, 5] *= 40  # an outlier column: per-block scales keep it from crushing the rest of the row
    exact = t
    row = quantize_operand(t, GradSpec("int8", "nearest", "token"), "row")
    block = quantize_operand(t, GradSpec("int8", "nearest", "block"), "block")
    column = quantize_operand(t, GradSpec("int8", "nearest", "channel"), "column")
    rotated = quantize_operand(t, GradSpec("int8", "nearest", "block", hadamard=True), "block")
    errors = {name: float((q - exact).norm() / exact.norm()) for name, q in
              (("row", row), ("block", block), ("column", column), ("rotated", rotated))}
    assert errors["block"] < errors["row"]  # the outlier spoils one block per row, not the whole row
    assert errors["column"] < errors["row"]  # its own column scale isolates it
    assert errors["rotated"] < 0.01 and rotated.shape == t.shape
    # Block scales: each 128-entry slice of a row maps its own absmax onto 127 (on the padded tail as well).
    for j in range(0, 300, 128):
        piece = t[:, j:j + 128]
        step = piece.abs().amax(dim=1, keepdim=True) / 127
        assert torch.allclose(block[:, j:j + 128], torch.floor(piece / step + 0.5).clamp(-127, 127) * step)


def _grads(recipe: Recipe, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, seed: int):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference_linear(x, w, recipe, grad_seed=torch.tensor(seed)).backward(g)
    return x.grad, w.grad


def test_quantized_backward_is_close_to_quest_and_its_mean_converges_to_it():
    torch.manual_seed(1)
    x, w, g = torch.randn(128, 256), torch.randn(256, 256) * 0.05, torch.randn(128, 256)
    quest = load_recipe("quest_w4a4")
    gx_q, gw_q = _grads(quest, x, w, g, 0)
    for name in ("quest_w4a4_g8", "quest_w4a4_g8g8"):
        recipe = load_recipe(name)
        assert torch.equal(reference_linear(x, w, recipe), reference_linear(x, w, quest))  # forward unchanged
        gx, gw = _grads(recipe, x, w, g, 0)
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        # One stochastic draw of e4m3 (three mantissa bits) is a few percent off QuEST's gradient.
        assert 1e-4 < rel(gx, gx_q) < 0.08
        assert (rel(gw, gw_q) == 0) == (name == "quest_w4a4_g8") and rel(gw, gw_q) < 0.08
        if name == "quest_w4a4_g8g8":
            # Unbiased: the mean of n seeded draws approaches QuEST's gradient as 1/sqrt(n).
            draws = [_grads(recipe, x, w, g, seed) for seed in range(16)]
            for i, exact in ((0, gx_q), (1, gw_q)):
                single = rel(draws[0][i], exact)
                mean4 = rel(torch.stack([d[i] for d in draws[:4]]).mean(0), exact)
                mean16 = rel(torch.stack([d[i] for d in draws]).mean(0), exact)
                # 1/sqrt(4) = 0.5 and 1/sqrt(16) = 0.25: no bias floor under the shrinking noise.
                assert 0.38 < mean4 / single < 0.65 and 0.18 < mean16 / single < 0.33


def test_a_whole_models_gradient_is_unbiased():
    # Every projection of a Llama with its own layer seed, one noise context per draw: the mean of n draws of the
    # quantized layers' weight gradient approaches QuEST's as 1/sqrt(n), with no bias floor (the same check on a
    # trained `tiny` model held to n = 64, at 0.14 % of the gradient; BENCHMARKS.md).
    from bitlaw.models.convert import convert, quantized_layers
    from bitlaw.models.llama import LlamaConfig, LlamaModel

    torch.manual_seed(3)
    model = LlamaModel(LlamaConfig(vocab_size=128, n_layer=2, d_model=128, n_head=2, max_seq_len=32))
    convert(model, load_recipe("quest_w4a4_g8g8"))
    layers = list(quantized_layers(model).values())
    tokens = torch.randint(0, 128, (4, 33))

    def grads(recipe: Recipe, index: int) -> torch.Tensor:
        for layer in layers:
            layer.recipe = recipe
        with noise_context(0, 0, index):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [layer.weight for layer in layers])])

    exact = grads(load_recipe("quest_w4a4"), 0).double()
    draws = torch.stack([grads(load_recipe("quest_w4a4_g8g8"), i).double() for i in range(16)])
    rel = lambda a: float((a - exact).norm() / exact.norm())  # noqa: E731
    single = sum(rel(d) for d in draws[:4]) / 4
    assert 1e-4 < single < 0.05
    assert 0.38 < rel(draws[:4].mean(0)) / single < 0.65 and 0.18 < rel(draws.mean(0)) / single < 0.33


def test_nearest_backward_fold_makes_the_codes_exact_operands():
    """With nearest rounding and a gradient whose folded values are on the int8 grid, the quantized backward equals
    QuEST's: the fold by half the weight's step is undone exactly."""
    torch.manual_seed(2)
    quest = load_recipe("quest_w4a4")
    recipe = dataclasses.replace(quest, grad_input=GradSpec("int8", "nearest", "token"))
    x, w = torch.randn(64, 128), torch.randn(128, 128)
    from bitlaw.kernels.quantizers import quantize

    unit = quantize(w, quest.weight).step.reshape(-1) / 2
    levels = torch.randint(-127, 128, (64, 128)).float()
    levels[:, 0] = 127
    g = levels / unit[None, :]  # g·u is an integer grid row with absmax 127: Q(g·u) = g·u exactly
    gx, _ = _grads(recipe, x, w, g, 0)
    gx_q, _ = _grads(quest, x, w, g, 0)
    assert torch.allclose(gx, gx_q, rtol=1e-5, atol=1e-5 * float(gx_q.abs().max()))


def test_seeds_are_reproducible_and_independent_per_rank_layer_and_micro_batch():
    with noise_context(seed=7, rank=0, index=3):
        first = [int(layer_seed("a")), int(layer_seed("a")), int(layer_seed("b"))]
    with noise_context(seed=7, rank=0, index=3):
        again = [int(layer_seed("a")), int(layer_seed("a")), int(layer_seed("b"))]
    with noise_context(seed=7, rank=1, index=3):
        rank1 = int(layer_seed("a"))
    with noise_context(seed=7, rank=0, index=4):
        later = int(layer_seed("a"))
    with noise_context(seed=8, rank=0, index=3):
        other_run = int(layer_seed("a"))
    assert first == again  # reproducible
    assert len(set(first)) == 3  # a second call of a layer, another layer: other bits
    assert len({first[0], rank1, later, other_run}) == 4
    a, b = uniform_pair(first[0], 64, 64)
    assert not torch.equal(a, b) and abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.05
    assert noise_index(global_step=5, batch_idx=11, accumulate=4) == 23


def test_ranks_draw_independent_but_reproducible_bits_in_a_layer():
    """What DDP ranks see: the same layer, weights and batch, the trainer's context with its own rank."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 128, bias=False)
    layer = QuantLinear.from_linear(linear, load_recipe("quest_w4a4_g8g8"), name="layers.0.mlp.down_proj")
    x = torch.randn(2, 64, 256)

    def grads(rank: int):
        layer.zero_grad()
        set_noise_context(seed=0, rank=rank, index=noise_index(10, 0, 1))
        layer(x).square().sum().backward()
        return layer.weight.grad.clone()

    rank0, rank1, rank0_again = grads(0), grads(1), grads(0)
    assert torch.equal(rank0, rank0_again) and not torch.equal(rank0, rank1)
    set_noise_context(0, 0, 0)


def test_training_sets_the_noise_context(monkeypatch):
    """LitLlama keys the bits by run seed, rank and micro-batch before each training step."""
    import bitlaw.train.module as module

    calls = []
    monkeypatch.setattr(module, "set_noise_context", lambda *args: calls.append(args))
    from bitlaw.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=64, n_layer=1, d_model=128, n_head=1, max_seq_len=16).to_dict()
    lit = module.LitLlama(config, load_recipe("quest_w4a4_g8").to_dict(), {"lr": 1e-3}, 10,
                          {"seed": 4, "seq_len": 16, "global_batch": 2})

    class Trainer:
        accumulate_grad_batches = 2
        global_rank = 1

    monkeypatch.setattr(module.LitLlama, "trainer", Trainer(), raising=False)
    monkeypatch.setattr(module.LitLlama, "global_step", 3, raising=False)
    monkeypatch.setattr(module.LitLlama, "global_rank", 1, raising=False)
    monkeypatch.setattr(module.LitLlama, "log", lambda *a, **k: None)
    monkeypatch.setattr(module.LitLlama, "lr_schedulers", lambda self: torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lambda s: 1.0))
    tokens = torch.randint(0, 64, (1, 16))
    lit.training_step((tokens, tokens), batch_idx=7)
    assert calls == [(4, 1, 3 * 2 + 1)]
