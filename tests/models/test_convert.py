"""convert() and QuantLinear: exactly the block projections, parameter reuse, idempotence, equal numerics; the
RecipeConverter: backend, the sparsity hooks, masked-fraction sampling, the backend report."""

import math

import pytest
import torch
from torch import nn

from bitlaw.kernels.linear import BackendChoice
from bitlaw.kernels.quantizers import reference_linear
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe
from bitlaw.models.convert import convert, quantized_layers
from bitlaw.models.converter import RecipeConverter
from bitlaw.models.llama import LlamaConfig, LlamaModel
from bitlaw.models.quant_linear import QuantLinear

PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def _tiny(n_layer=2, d_model=256, n_head=2, vocab=128):
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=vocab, n_layer=n_layer, d_model=d_model, n_head=n_head, max_seq_len=32))


def test_convert_touches_exactly_the_block_projections():
    model = _tiny(n_layer=3)
    params_before = {name: p for name, p in model.named_parameters()}
    convert(model, load_recipe("quest_w4a4"))
    converted = set(quantized_layers(model))
    expected = {f"layers.{i}.{p}" for i in range(3) for p in PROJECTIONS}
    assert converted == expected
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    # Same parameter objects under the same names: optimizers and checkpoints are unaffected.
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)


def test_convert_is_idempotent_and_reversible():
    model = _tiny()
    recipe = load_recipe("quest_w4a4")
    convert(model, recipe)
    layers = quantized_layers(model)
    convert(model, recipe)
    assert all(quantized_layers(model)[k] is v for k, v in layers.items())
    weight = model.layers[0].mlp.up_proj.weight
    convert(model, load_recipe("quest_w2a2"))
    assert model.layers[0].mlp.up_proj.recipe.name == "quest_w2a2"
    convert(model, load_recipe("bf16"))
    assert not quantized_layers(model)
    assert type(model.layers[0].mlp.up_proj) is nn.Linear and model.layers[0].mlp.up_proj.weight is weight


def test_convert_on_meta_then_materialise():
    cfg = LlamaConfig(vocab_size=128, n_layer=2, d_model=256, n_head=2, max_seq_len=32)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    convert(model, load_recipe("quest_w4a4"))
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    logits = model(torch.randint(0, 128, (2, 16)))
    assert torch.isfinite(logits).all()


def test_quantlinear_equals_the_reference_function_and_bf16_equals_linear():
    model = _tiny()
    plain = model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 256)
    expected_plain = plain(x)
    recipe = load_recipe("quest_w4a4")
    convert(model, recipe)
    layer = model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer(x), reference_linear(x, layer.weight, recipe), rtol=0, atol=0)
    convert(model, Recipe())
    torch.testing.assert_close(model.layers[0].self_attn.q_proj(x), expected_plain, rtol=0, atol=0)


def test_quantized_model_trains_and_reports_masked_fraction():
    model = _tiny()
    convert(model, load_recipe("quest_w4a4"))
    for layer in quantized_layers(model).values():
        layer.track_stats = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        _, loss = model(batch, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    stats = model.layers[0].mlp.down_proj.stats
    assert 0 < stats["weight_masked_fraction"] < 0.05 and 0 <= stats["input_masked_fraction"] < 0.2


def test_lsq_layer_learns_its_scale():
    model = _tiny()
    convert(model, load_recipe("lsq_ht_w4a4"))
    layer = model.layers[0].mlp.up_proj
    assert {n for n, _ in layer.named_parameters()} == {"weight", "weight_lsq_scale", "input_lsq_scale"}
    x = torch.randn(8, 256)
    layer(x).square().mean().backward()
    assert layer.lsq_initialized
    assert layer.weight_lsq_scale.item() == pytest.approx(2.514 * layer.weight.detach().square().mean().sqrt().item(),
                                                          rel=1e-3)
    assert layer.weight_lsq_scale.grad is not None and layer.weight_lsq_scale.grad.abs() > 0
    assert layer.input_lsq_scale.grad.abs() > 0


def test_quest_lsq_layer_learns_its_step_from_lsqs_init():
    model = _tiny()
    convert(model, load_recipe("lsq_w4a4"))
    layer = model.layers[0].mlp.up_proj
    x = torch.randn(8, 256)
    layer(x).square().mean().backward()
    # QuEST's LSQ init: 2·mean|t| / sqrt(Q_P), Q_P = 7 at 4 bits, over the tensor itself (no rotation).
    assert layer.weight_lsq_scale.item() == pytest.approx(2 * layer.weight.detach().abs().mean().item() / 7**0.5,
                                                          rel=1e-6)
    assert layer.input_lsq_scale.item() == pytest.approx(2 * x.abs().mean().item() / 7**0.5, rel=1e-6)
    assert layer.weight_lsq_scale.grad.abs() > 0 and layer.input_lsq_scale.grad.abs() > 0
    assert layer.weight_decayed_scales() == [layer.weight_lsq_scale, layer.input_lsq_scale]


def test_convert_rejects_a_width_the_block_does_not_divide_before_swapping():
    model = _tiny(d_model=192, n_head=3, vocab=64)  # head_dim 64: a valid model, but 192 % 128 != 0
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj \(recipe 'quest_w4a4', weight\): block=128 "
                                         r"does not divide in_features=192"):
        convert(model, load_recipe("quest_w4a4"))
    assert not quantized_layers(model)
    convert(model, load_recipe("noht_w4a4"))
    assert len(quantized_layers(model)) == 14


def test_filters():
    model = _tiny()
    convert(model, load_recipe("quest_w4a4"), r"layers\.\d+\.mlp\..*")
    assert {n.split(".", 2)[2] for n in quantized_layers(model)} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    convert(model, load_recipe("quest_w4a4"), lambda name, m: name == "lm_head")
    assert isinstance(model.lm_head, QuantLinear)
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        convert(model, load_recipe("quest_w4a4"), r"nothing")


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_converter_converts_sets_the_backend_and_is_idempotent():
    model = _tiny()
    converter = RecipeConverter(load_recipe("quest_w4a4"), backend="reference")
    assert converter.convert(model) is model
    layers = quantized_layers(model)
    assert set(layers) == {f"layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert all(layer.backend == "reference" for layer in layers.values())
    converter.convert(model)
    assert all(quantized_layers(model)[k] is v for k, v in layers.items())
    # Another converter's filter: only its layers get its recipe and its backend.
    RecipeConverter(load_recipe("quest_w2a2"), r"layers\.\d+\.mlp\..*", backend="triton").convert(model)
    for name, layer in quantized_layers(model).items():
        assert (layer.recipe.name, layer.backend) == (("quest_w2a2", "triton") if ".mlp." in name
                                                      else ("quest_w4a4", "reference")), name
    RecipeConverter(Recipe()).convert(model)
    assert not quantized_layers(model)
    with pytest.raises(ValueError, match=r"backend='cuda' is not allowed; allowed: auto, reference, triton"):
        RecipeConverter(load_recipe("quest_w4a4"), backend="cuda")


def test_pre_step_hook_drives_the_cubic_schedule_of_the_sparse_layers_only():
    model = _tiny()
    cubic = Recipe(name="cubic", weight=TensorSpec(format="bf16", sparsity=0.75, schedule="cubic", ramp=0.5))
    converter = RecipeConverter(cubic, r"layers\.\d+\.mlp\..*")
    converter.convert(model)
    RecipeConverter(load_recipe("quest_w4a4"), r"layers\.\d+\.self_attn\..*").convert(model)
    layers = quantized_layers(model)
    for step, sparsity in [(0, 0.0), (5, 0.75 * (1 - 0.5**3)), (10, 0.75), (19, 0.75)]:
        converter.pre_step_hook(model, step, 20)
        for name, layer in layers.items():
            if ".mlp." in name:
                zeros = (layer.quantized_weight().values == 0).sum(-1)
                assert (zeros == math.floor(sparsity * layer.in_features + 0.5)).all(), (step, name)
            else:  # not sparse: never told the progress
                assert layer.progress.tolist() == [-1, 1], name


def test_post_optimizer_hook_moves_rigl_masks_only_on_update_steps():
    model = _tiny()
    spec = TensorSpec(format="bf16", sparsity=0.5, sparse_rule="rigl", update_every=3, drop_fraction=0.5)
    converter = RecipeConverter(Recipe(name="rigl", weight=spec))
    converter.convert(model)
    layers = quantized_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    total = 8  # updates after steps 0 and 3 (6 is past rigl_stop · 8 = 6)
    for step in range(total):
        converter.pre_step_hook(model, step, total)
        _, loss = model(_batch(step), _batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = {name: layer.rigl_mask.clone() for name, layer in layers.items()}
        converter.post_optimizer_hook(model)
        changed = {name for name, layer in layers.items() if not torch.equal(before[name], layer.rigl_mask)}
        assert changed == (set(layers) if step in (0, 3) else set()), step
        for name, layer in layers.items():
            assert (layer.rigl_mask.sum(-1) == layer.in_features // 2).all(), (step, name)
            assert (layer.weight[layer.rigl_mask & ~before[name]] == 0).all(), (step, name)  # grown weights start at 0


def test_track_masks_switches_the_masked_fraction_sampling():
    model = _tiny()
    converter = RecipeConverter(load_recipe("quest_w4a4"))
    converter.convert(model)
    model(_batch())
    assert converter.masked_fractions(model) == {}
    converter.track_masks(model, True)
    model(_batch())
    fractions = converter.masked_fractions(model)
    assert set(fractions) == {f"mask/layers.{i}.{p}.{role}" for i in range(2) for p in PROJECTIONS
                              for role in ("weight", "input")}
    down = model.layers[0].mlp.down_proj.stats
    assert fractions["mask/layers.0.mlp.down_proj.weight"] == down["weight_masked_fraction"].item() > 0
    assert fractions["mask/layers.0.mlp.down_proj.input"] == down["input_masked_fraction"].item()
    assert all(0 <= value < 0.2 for value in fractions.values())
    converter.track_masks(model, False)
    assert not any(layer.track_stats for layer in quantized_layers(model).values())
    model(_batch())
    assert converter.masked_fractions(model) == {}


def test_backend_report_names_each_kind_its_path_and_reason():
    model = _tiny()
    converter = RecipeConverter(load_recipe("quest_w4a4"), backend="reference")
    converter.convert(model)
    assert converter.record_backends(model) == {} and converter.backend_report() == {}  # no forward yet
    model(_batch())
    reason = "backend=reference requested (the backend argument)"
    assert converter.record_backends(model) == {f"backend/{p}": 0.0 for p in PROJECTIONS}
    assert converter.backend_report() == {p: {"backend": "reference", "reason": reason} for p in PROJECTIONS}
    model.layers[1].mlp.up_proj.last_backend = BackendChoice("triton", None)
    metrics = converter.record_backends(model)
    assert metrics["backend/mlp.up_proj"] == 0.5 and metrics["backend/mlp.gate_proj"] == 0.0
    report = converter.backend_report()
    assert report["mlp.up_proj"] == {"backend": "mixed", "reason": reason}
    assert report["mlp.gate_proj"] == {"backend": "reference", "reason": reason}
