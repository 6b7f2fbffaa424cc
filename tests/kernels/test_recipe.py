"""Recipe types: presets load from conf/quant, round-trip through dicts, and reject bad input clearly."""

import dataclasses
import math

import pytest

from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe, recipe_names

REQUIRED = ["bf16", *(f"quest_w{b}a{b}" for b in (1, 2, 3, 4, 8)), *(f"quest_w{b}" for b in (1, 2, 3, 4)),
            "quest_fp4", "noht_w4a4", "ste_w4a4", "clip1_w4a4", "lsq_w4a4", "lsq_ht_w4a4", "absmax_w4a4", "quest_w4z",
            "quest_w4za4z", *(f"quest_w{b}_rotated" for b in (1, 2, 3, 4))]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(recipe_names())


@pytest.mark.parametrize("name", REQUIRED)
def test_presets_round_trip_through_dicts(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_preset_contents():
    w4a4 = load_recipe("quest_w4a4")
    assert w4a4.weight == w4a4.input == TensorSpec(format="int4", scale="gaussian_rms", grad="trust",
                                                   rotation="hadamard", block=128)
    w1a1 = load_recipe("quest_w1a1")
    assert w1a1.input.grad == "clip" and w1a1.input.mask_threshold == 1.30
    w2 = load_recipe("quest_w2")
    assert w2.weight.format == "int2" and not w2.input.quantized
    assert not load_recipe("bf16").quantized
    assert load_recipe("noht_w4a4").input.rotated is False
    assert load_recipe("quest_fp4").weight.format == "fp4_e2m1"
    w4za4z = load_recipe("quest_w4za4z")
    assert w4za4z.weight == w4za4z.input == dataclasses.replace(w4a4.weight, format="int4z")
    w4z = load_recipe("quest_w4z")
    assert w4z.weight == w4za4z.weight and not w4z.input.quantized


def test_mask_thresholds():
    assert TensorSpec(format="int4").mask_threshold == pytest.approx(16 / 15)
    assert TensorSpec(format="int1").mask_threshold == pytest.approx(2.0)
    assert TensorSpec(format="int1", grad="clip").mask_threshold == 1.30
    assert TensorSpec(format="int1", grad="clip", rotation="none").mask_threshold == 1.25
    assert TensorSpec(format="int4", grad="ste").mask_threshold == math.inf  # masks nothing
    assert TensorSpec(format="int4", grad="clip", clip=1.0).mask_threshold == 1.0
    assert TensorSpec(format="int4z").mask_threshold == pytest.approx(15 / 14)  # the positive side (half a step)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_recipe("quest_w4a4").weight.block = 64


@pytest.mark.parametrize(("data", "expected"), [
    ({"format": "int9"}, r"weight\.format='int9'.*1 to 8 bits.*int1"),
    ({"format": "int0"}, r"weight\.format='int0'.*1 to 8 bits"),
    ({"format": "nf4"}, r"weight\.format='nf4'.*allowed.*int1.*ternary.*bf16"),
    ({"format": "int4", "scale": "minmax"}, r"weight\.scale='minmax'.*allowed: gaussian_rms, absmax, lsq"),
    ({"format": "int4", "grad": "pact"}, r"weight\.grad='pact'.*allowed: trust, clip, ste"),
    ({"format": "int4", "rotation": "random"}, r"weight\.rotation='random'.*allowed: hadamard, none"),
    ({"format": "int4", "block": 96}, r"weight\.block=96.*power of two"),
    ({"format": "int4", "clip": 1.3}, r"weight\.clip=1\.3.*only allowed with grad='clip'"),
    ({"format": "int1", "grad": "clip", "clip": -1}, r"weight\.clip=-1.*positive"),
    ({"formt": "int4"}, r"weight: unknown field\(s\) \['formt'\].*allowed: format, scale, grad"),
])
def test_validation_errors_name_field_and_allowed_values(data, expected):
    with pytest.raises(ValueError, match=expected):
        Recipe.from_dict({"name": "bad", "weight": data})


def test_unknown_preset_and_top_level_key():
    with pytest.raises(ValueError, match="quant preset 'quest_w5a5' not found; allowed: .*quest_w4a4"):
        load_recipe("quest_w5a5")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['activation'\]"):
        Recipe.from_dict({"activation": {"format": "int4"}})


def test_block_must_divide_in_features():
    recipe = load_recipe("quest_w4a4")
    with pytest.raises(ValueError, match=r"q_proj \(recipe 'quest_w4a4', weight\): block=128 does not divide "
                                         r"in_features=192.*blocks that divide it: 16, 32, 64"):
        recipe.check_in_features(192, "q_proj")
    recipe.check_in_features(256, "q_proj")
    load_recipe("noht_w4a4").check_in_features(192, "q_proj")  # no rotation, no constraint
