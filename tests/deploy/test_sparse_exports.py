"""Exports of sparse, grouped and outlier-keeping recipes: the packed formats refuse them before writing anything,
naming the field; the Hugging Face export writes the weights exactly as the layers use them (RigL's mask too)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bitlaw.deploy.compressed import storage_plan
from bitlaw.deploy.export import main
from bitlaw.deploy.hf import export_hf
from bitlaw.deploy.load import load_checkpoint
from bitlaw.deploy.native import check_native_recipe, export_native
from bitlaw.kernels.recipe import Recipe, TensorSpec, load_recipe
from bitlaw.models.convert import convert
from tests.deploy.checkpoints import small_checkpoint, tokens


@pytest.mark.parametrize(("recipe", "field"), [("sparse50_w4a4", "sparsity"), ("quest_w4a4_g32", "group"),
                                               ("quest_w4a4_outliers1", "outliers"), ("sparse_2of4", "sparsity")])
def test_packed_exports_refuse_naming_the_field(recipe, field):
    with pytest.raises(ValueError, match=rf"recipe '{recipe}': weight {field} is not supported by the native export"):
        check_native_recipe(load_recipe(recipe))
    with pytest.raises(ValueError, match=rf"recipe '{recipe}': weight {field} is not supported by the "
                                         "compressed-tensors export"):
        storage_plan(load_recipe(recipe))
    inputs = Recipe(name="in", weight=TensorSpec(format="int4"), input=TensorSpec(format="int4", group=32))
    check_native_recipe(inputs)  # the native loader quantizes inputs live with the training code: exact
    with pytest.raises(ValueError, match=r"recipe 'in': input group is not supported by the compressed-tensors"):
        storage_plan(inputs)


def test_native_export_refuses_before_writing(tmp_path):
    loaded = load_checkpoint(small_checkpoint(tmp_path, "quest_w4a4_outliers1"))
    with pytest.raises(ValueError, match=r"weight outliers is not supported by the native export yet.*nothing was"):
        export_native(loaded, tmp_path / "native")
    assert not (tmp_path / "native").exists()


def test_cli_refusal_is_one_line(tmp_path, capsys):
    checkpoint = small_checkpoint(tmp_path, "rigl50")
    assert main([str(checkpoint), "--format", "native", "--out", str(tmp_path / "out"), "--no-tokenizer"]) == 2
    assert "recipe 'rigl50': weight sparsity is not supported by the native export yet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hf_export_of_a_sparse_quantized_recipe_matches_its_weight_only_forward(tmp_path):
    transformers = pytest.importorskip("transformers")
    trained = load_checkpoint(small_checkpoint(tmp_path, "sparse50_w4a4"))
    notes = export_hf(trained, tmp_path / "hf")
    assert any("weight-only" in note for note in notes)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                       dtype=torch.float32).eval()
    convert(trained.model, Recipe(name="w-only", weight=trained.recipe.weight, input=Recipe().input))
    with torch.no_grad():
        ours = trained.model(tokens())
        theirs = hf(input_ids=tokens()).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())


def test_hf_export_uses_the_layers_rigl_mask(tmp_path):
    path = small_checkpoint(tmp_path, "rigl50")
    checkpoint = torch.load(path, weights_only=False)
    masks = {}
    for key in [k for k in checkpoint["state_dict"] if k.endswith(".rigl_mask")]:
        # Any mask with the right count, not the weights' own top half: the export must read the saved one.
        scores = torch.rand(checkpoint["state_dict"][key].shape, generator=torch.Generator().manual_seed(len(masks)))
        masks[key] = scores >= scores.median(-1, keepdim=True).values
        checkpoint["state_dict"][key] = masks[key]
    torch.save(checkpoint, path)
    export_hf(load_checkpoint(path), tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert len(masks) == 14
    for key, mask in masks.items():
        weight = weights[key.replace(".rigl_mask", ".weight")]  # "model.layers.…" in both namings
        assert torch.equal(weight != 0, mask), key
