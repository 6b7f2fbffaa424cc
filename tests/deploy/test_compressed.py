"""The compressed-tensors export, checked with clients nobody here wrote: compressed-tensors unpacks and decompresses
it, transformers builds the model, compressed-tensors applies the declared Hadamard transform; the logits must
equal bitlaw's quantized forward where the grid allows, and the inexact paths must say so and measure their cost."""

from __future__ import annotations

import json

import pytest
import torch

from bitlaw.deploy.compressed import (
    export_compressed_tensors,
    load_for_transformers,
    pack_int32,
    storage_plan,
    trained_as_integers,
)
from bitlaw.deploy.evaluate import main as eval_main
from bitlaw.deploy.export import main as export_main
from bitlaw.deploy.load import load_checkpoint
from bitlaw.kernels.quantizers import quantize
from bitlaw.kernels.recipe import load_recipe
from tests.deploy.checkpoints import small_checkpoint, tokens
from tests.helpers import compose_train, small_overrides, train

pytest.importorskip("compressed_tensors")
pytest.importorskip("transformers")


@pytest.mark.parametrize(("recipe", "bits", "weights_exact", "input_bits"), [
    ("quest_w1", 4, True, None), ("quest_w2", 4, True, None), ("quest_w3", 4, True, None),
    ("quest_w4", 8, True, None), ("quest_w4z", 4, True, None), ("quest_w4a4", 8, True, 4),
    ("quest_w8a8", 8, False, 8), ("quest_w4za4z", 4, True, 4), ("noht_w4a4", 8, True, 4),
    ("quest_w4_rotated", 8, True, None),
])
def test_the_plan_stores_each_grid_in_the_narrowest_exact_width(recipe, bits, weights_exact, input_bits):
    plan = storage_plan(load_recipe(recipe))
    # A recipe that quantizes inputs is never exact as a whole: the engine's per-token quantizer is not QuEST's.
    exact = weights_exact and input_bits is None
    assert (plan.bits, plan.weights_exact, plan.exact, plan.input_bits) == (bits, weights_exact, exact,
                                                                            input_bits), plan
    # layout 'rotated' multiplies the plain input by Q(W·H): stored as it is, no transform to declare.
    assert plan.rotation == ("none" if recipe.startswith("noht") or recipe.endswith("_rotated") else "online")


@pytest.mark.parametrize(("recipe", "options", "message"), [
    ("bf16", {}, "recipe 'bf16' keeps its weights in bf16: there is nothing for compressed-tensors to pack"),
    ("quest_fp4", {}, "weight format 'fp4_e2m1' is not integers times one scale per row"),
    ("quest_w4", {"bits": 3}, "--bits 3 is not allowed; allowed: 4, 8"),
    ("quest_w4", {"rotation": "inverse"}, "--rotation 'inverse' is not allowed; allowed: online, folded"),
])
def test_recipes_without_an_integer_form_are_refused_with_the_reason(recipe, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        storage_plan(load_recipe(recipe), **options)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_what_compressed_tensors_unpacks(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    integers = torch.randint(low, high + 1, (5, 72), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    packed = pack_int32(integers, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 72 * bits // 32)
    assert torch.equal(unpack_from_int32(packed, bits, integers.shape), integers)


@pytest.mark.parametrize("recipe", ["quest_w1", "quest_w4", "quest_w4z", "quest_w4a4"])
def test_stored_integers_times_scales_are_the_trained_values_bitwise(recipe):
    spec = load_recipe(recipe).weight
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    res = quantize(weight, spec)
    integers, scale = trained_as_integers(res, spec.fmt)
    assert integers.dtype == torch.int8 and scale.shape == (64, 1)
    assert torch.equal(integers.float() * scale, res.values)


@pytest.mark.parametrize(("recipe", "options"), [("quest_w2", {}), ("quest_w4", {}), ("quest_w4z", {}),
                                                  ("quest_w2_rotated", {})])
def test_exact_exports_give_bitlaws_logits_in_transformers(tmp_path, recipe, options):
    loaded = load_checkpoint(small_checkpoint(tmp_path, recipe))
    plan = storage_plan(loaded.recipe, **options)
    assert plan.exact
    export_compressed_tensors(loaded, tmp_path / "ct", plan)
    ids = tokens()
    with torch.no_grad():
        ours = loaded.model(ids)
        theirs = load_for_transformers(tmp_path / "ct")(input_ids=ids).logits
    relative = ((theirs - ours).abs().max() / ours.abs().max()).item()
    assert relative <= 1e-5, relative
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == plan.bits
    if plan.rotation == "online":
        assert config["transform_config"]["config_groups"]["bitlaw_hadamard"]["head_dim"] == 128
    else:
        assert not config["transform_config"]


def test_without_the_transform_the_logits_are_wrong_which_is_why_the_loader_applies_it(tmp_path):
    from transformers import LlamaForCausalLM

    loaded = load_checkpoint(small_checkpoint(tmp_path, "quest_w4"))
    export_compressed_tensors(loaded, tmp_path / "ct", storage_plan(loaded.recipe))
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = loaded.model(tokens()), plain(input_ids=tokens()).logits
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() > 1e-2


@pytest.fixture(scope="module")
def w4_run(corpus, tmp_path_factory):
    """A 12-step quest_w4 training run (weight-only int4, Hadamard) with its data set."""
    base = tmp_path_factory.mktemp("w4")
    train(compose_train(small_overrides(corpus, base / "cache", base / "run", "quest_w4")))
    return base / "run"


def test_bitlaw_eval_gives_one_loss_for_the_checkpoint_and_every_export(w4_run, tmp_path, capsys):
    for fmt in ("native", "hf", "compressed-tensors"):
        assert export_main([str(w4_run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    out = capsys.readouterr().out
    assert "wrote " + str(tmp_path / "compressed-tensors") + " (W8A16, rotation online; weights exact)" in out
    assert "validation loss on training's validation windows (2 × 8, seq_len 32): checkpoint " in out
    measured = json.loads((tmp_path / "compressed-tensors" / "bitlaw.json").read_text())["measured"]
    assert abs(measured["difference"]) < 1e-5 and measured["loaded_with"].startswith("transformers ")
    losses = {}
    for source in (w4_run, *(tmp_path / fmt for fmt in ("native", "hf", "compressed-tensors"))):
        assert eval_main([str(source), "--no-progress", "--json"]) == 0  # no --data-dir: the export knows its data
        result = json.loads(capsys.readouterr().out)
        losses[result["kind"]] = (result["loss"], result["windows"], result["seq_len"])
    assert len({(round(loss, 5), windows, seq_len) for loss, windows, seq_len in losses.values()}) == 1, losses


def test_inexact_exports_say_why_and_measure_the_loss_they_cost(w4_run, tmp_path, capsys):
    assert export_main([str(w4_run), "--format", "compressed-tensors", "--bits", "4", "--out",
                        str(tmp_path / "w4")]) == 0
    assert export_main([str(w4_run), "--format", "compressed-tensors", "--rotation", "folded", "--out",
                        str(tmp_path / "folded")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'w4'} (W4A16, rotation online; weights requantized: inexact)" in out
    assert "note: inexact: the int4 codes (-15 … 15) do not fit 4-bit integers: weights requantized to 4 bits" in out
    assert "note: inexact: Hadamard rotation folded into the weights, which were requantized to 8 bits" in out
    for name in ("w4", "folded"):
        meta = json.loads((tmp_path / name / "bitlaw.json").read_text())
        assert meta["storage"]["exact"] is False and meta["measured"]["difference"] == pytest.approx(
            meta["measured"]["export_loss"] - meta["measured"]["trained_loss"])
    folded = json.loads((tmp_path / "folded" / "config.json").read_text())["quantization_config"]
    assert folded["transform_config"] == {}  # nothing for a loader to apply: plain from_pretrained is right


def test_activation_quantization_is_declared_as_a_serving_engine_applies_it(tmp_path):
    loaded = load_checkpoint(small_checkpoint(tmp_path, "quest_w4a4"))
    notes = export_compressed_tensors(loaded, tmp_path / "ct", storage_plan(loaded.recipe))
    assert any("dynamic, symmetric, per token, 4 bits" in note for note in notes)
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert group["group_0"]["input_activations"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                     "strategy": "token", "dynamic": True}
    model = load_for_transformers(tmp_path / "ct")
    weight_only = load_checkpoint(small_checkpoint(tmp_path, "quest_w4", name="w4"))
    with torch.no_grad():
        served = model(input_ids=tokens()).logits
    assert torch.isfinite(served).all() and not torch.equal(served, weight_only.model(tokens()))


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    fp4 = small_checkpoint(tmp_path, "quest_fp4")
    cases = [
        ([str(fp4), "--format", "compressed-tensors"], "weight format 'fp4_e2m1' is not integers times one scale"),
        ([str(fp4), "--format", "native", "--bits", "4"], "--bits: only for --format compressed-tensors, not native"),
        ([str(fp4), "--format", "compressed-tensors", "--bits", "2"], "--bits 2 is not allowed; allowed: 4, 8"),
    ]
    for argv, message in cases:
        assert export_main([*argv, "--out", str(tmp_path / "out"), "--no-tokenizer"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitlaw-export: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
