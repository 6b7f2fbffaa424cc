"""bitlaw-compress end to end on a two-block model trained in the test: stages, the export other tools read
(bitlaw-eval, bitlaw-export, transformers), the report, and bad input refused before anything is written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bitlaw.compress.cli import compress, data_overrides, plan
from bitlaw.compress.cli import main as compress_main
from bitlaw.core.config import CONF_DIR
from bitlaw.deploy.evaluate import main as evaluate_main
from bitlaw.deploy.export import main as export_main
from bitlaw.deploy.generate import main as generate_main
from bitlaw.deploy.native import load_native
from bitlaw.models.frozen_linear import frozen_layers
from bitlaw.train.cli import train
from tests.helpers import compose_train, small_overrides

QUICK = ["calibration.sequences=16", "calibration.length=32", "evaluation.max_batches=4", "chunk_size=8"]


@pytest.fixture(scope="module")
def bf16_run(corpus, tmp_path_factory) -> tuple[Path, list[str]]:
    """A two-block bf16 model trained 12 steps on the test corpus; returns its run directory and the data overrides
    that name its data set."""
    base = tmp_path_factory.mktemp("compress")
    run_dir = base / "run"
    overrides = small_overrides(corpus, base / "cache", run_dir) + ["model.n_layer=2"]
    train(compose_train(overrides))
    data = [o for o in overrides if o.startswith("data")]
    return run_dir, data


def configured(source: Path, out: Path, data: list[str], *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="compress", overrides=[f"source={source}", f"out={out}", *data, *QUICK,
                                                          *overrides])


def run_main(main, args: list[str], capsys) -> tuple[int, str, str]:
    """An argparse command's ``main(args)`` in this process (a fresh one spends seconds importing torch):
    ``(exit status, stdout, stderr)``."""
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_sparsegpt_with_gptq_writes_an_export_bitlaw_eval_and_transformers_read(bf16_run, tmp_path, capsys):
    run_dir, data = bf16_run
    out = tmp_path / "out"
    report = compress(plan(configured(run_dir, out, data, "prune=sparsegpt", "prune.sparsity=0.5",
                                      "prune.allocation=scheduled", "gptq=w4")))
    assert [s["stage"] for s in report["stages"]] == ["source", "sparsegpt50-scheduled+gptq-int4"]
    final = report["stages"][-1]
    # The scheduled allocation keeps the parameter-weighted mean at the target (per-row counts round it).
    assert final["size"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len({round(row["sparsity"], 2) for row in final["size"]["layers"].values()}) > 1
    for name in ("report.json", "report.md", "sparsity.png", "bitlaw.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "bitlaw.json").read_text())
    assert {"report.json", "report.md", "sparsity.png"} <= set(manifest["files"])

    # The export holds frozen layers with their masks; the report's storage count is the tensor file's content.
    loaded = load_native(out)
    frozen = frozen_layers(loaded.model)
    assert len(frozen) == 2 * 7 and all(layer.mask is not None for layer in frozen.values())
    header = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert final["size"]["bytes"] == report["file_bytes"] - 8 - header

    # bitlaw-eval measures the loss the report recorded after the last stage.
    capsys.readouterr()
    status, stdout, stderr = run_main(evaluate_main, [str(out), "--max-batches", "4", "--json"], capsys)
    assert status == 0, stderr
    assert json.loads(stdout)["loss"] == pytest.approx(final["eval"]["loss"], abs=1e-6)

    # bitlaw-export writes a Hugging Face directory from it; transformers' logits equal the compressed model's.
    status, _, stderr = run_main(export_main, [str(out), "--format", "hf", "--out", str(tmp_path / "hf")], capsys)
    assert status == 0, stderr
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                             dtype=torch.float32).eval()
    ids = torch.randint(0, loaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(input_ids=ids).logits, loaded.model(ids), rtol=1e-4, atol=1e-4)


def test_shortgpt_removes_blocks_and_the_export_generates(bf16_run, tmp_path, capsys):
    run_dir, data = bf16_run
    out = tmp_path / "out"
    report = compress(plan(configured(run_dir, out, data, "shortgpt=default", "shortgpt.blocks=1")))
    info = report["stages"][-1]["info"]
    assert len(info["block_influence"]) == 2 and len(info["removed"]) == 1
    assert info["removed"] == [min(range(2), key=lambda i: info["block_influence"][i])]
    assert load_native(out).config.n_layer == 1 and report["stages"][-1]["size"]["n_layer"] == 1
    capsys.readouterr()
    status, stdout, stderr = run_main(generate_main, [str(out), "--prompt", "the quick", "--max-new-tokens", "5",
                                                      "--greedy"], capsys)
    assert status == 0, stderr
    assert stdout.strip()


def test_gptq_then_pv_keeps_the_best_step_on_held_out_training_windows(bf16_run, tmp_path):
    run_dir, data = bf16_run
    report = compress(plan(configured(run_dir, tmp_path / "out", data, "gptq=w2", "pv=default", "pv.steps=3",
                                      "pv.select_every=2", "pv.selection_sequences=8", "pv.batch_size=8",
                                      "pv.lr_v=10", "pv.tau=0.05")))
    assert [s["stage"] for s in report["stages"]] == ["source", "gptq-int2", "pv3"]
    history = report["stages"][-1]["info"]
    assert history["val_steps"] == [0, 2, 3] and len(history["val_loss"]) == 3
    assert history["val_loss"][history["val_steps"].index(history["best_step"])] == min(history["val_loss"])
    assert report["stages"][1]["size"]["bits_per_weight"] < 2.5  # 2-bit codes, one fp32 step per row
    loaded = load_native(tmp_path / "out")
    assert loaded.recipe.weight.format == "int2" and len(frozen_layers(loaded.model)) == 2 * 7


def test_a_hugging_face_llama_directory_is_a_source(bf16_run, tmp_path, capsys):
    run_dir, data = bf16_run
    status, _, stderr = run_main(export_main, [str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")],
                                 capsys)
    assert status == 0, stderr
    (tmp_path / "hf" / "bitlaw.json").unlink()  # as if another tool had written it
    from_hf = compress(plan(configured(tmp_path / "hf", tmp_path / "a", data, "prune=magnitude")))
    from_run = compress(plan(configured(run_dir, tmp_path / "b", data, "prune=magnitude")))
    for stage_hf, stage_run in zip(from_hf["stages"], from_run["stages"], strict=True):
        assert stage_hf["eval"]["loss"] == pytest.approx(stage_run["eval"]["loss"], abs=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["prune=sparsegpt", "prune.sparsity=1.0"], "prune.sparsity=1.0 is not allowed; allowed: a number in [0, 1)"),
    (["shortgpt=default", "shortgpt.blocks=2"], "blocks to remove, but the model has 2"),
    (["prune=sparsegpt", "calibration.sequences=100000"], "asked for 100000 calibration sequences"),
    (["prune=sparsegpt", "calibration.length=4096"], "calibration.length=4096 is longer than the model's max_seq_len"),
    (["prune=magnitude", "gptq=w4"], "prune=magnitude cannot be followed by gptq"),
    (["prune=sparsegpt", "prune.nm=4:2", "prune.sparsity=null"], 'prune.nm=\'4:2\' is not allowed'),
    (["pv=default"], "has no quantized layer"),
    ([], "no stage selected"),
])
def test_bad_input_is_refused_before_any_work_and_nothing_written(bf16_run, tmp_path, overrides, message):
    run_dir, data = bf16_run
    with pytest.raises(ValueError, match=re.escape(message)):
        compress(plan(configured(run_dir, tmp_path / "out", data, *overrides)))
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_reports_bad_input_in_one_line_with_status_2(bf16_run, tmp_path, monkeypatch, capsys):
    run_dir, data = bf16_run
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bitlaw-compress", f"source={run_dir}", f"out={out}", *data, *QUICK,
                                      "shortgpt=default", "shortgpt.fraction=0.9"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compress_main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("bitlaw-compress: shortgpt.fraction=0.9 → 2 blocks to remove, but the model "
                                       "has 2; allowed: fewer than 2 (at least one block must remain)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_a_llama_is_refused(bf16_run, tmp_path):
    _, data = bf16_run
    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="is not a Llama: model_type='gpt2'"):
        compress(plan(configured(source, tmp_path / "out", data, "prune=magnitude")))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a bitlaw-train process of its own (~25 s); bitlaw-train's init_from is tested in tests/train
def test_healing_fine_tunes_the_pruned_model_through_bitlaw_train(bf16_run, tmp_path):
    run_dir, data = bf16_run
    # The data overrides go to the healing run, as bitlaw-compress passes its command line's.
    report = compress(plan(configured(run_dir, tmp_path / "out", data, "shortgpt=default", "shortgpt.blocks=1",
                                      "shortgpt.heal_tokens=4096", "shortgpt.heal_lr=3e-3"), data))
    pruned_then_healed = report["stages"][-1]
    assert pruned_then_healed["info"]["healed_tokens"] == 4096
    unhealed = compress(plan(configured(run_dir, tmp_path / "plain", data, "shortgpt=default", "shortgpt.blocks=1")))
    assert pruned_then_healed["info"]["before_healing"] == unhealed["stages"][-1]["eval"]
    assert pruned_then_healed["eval"]["loss"] < unhealed["stages"][-1]["eval"]["loss"]


def test_two_of_four_sparsegpt_leaves_exactly_two_nonzeros_in_every_group_of_four(bf16_run, tmp_path):
    run_dir, data = bf16_run
    report = compress(plan(configured(run_dir, tmp_path / "out", data, "prune=sparsegpt", "prune.nm=2:4",
                                      "prune.sparsity=null")))
    assert report["stages"][-1]["stage"] == "sparsegpt2of4-uniform"
    model = load_native(tmp_path / "out").model
    for name, module in model.named_modules():
        if name.startswith("layers.") and isinstance(module, torch.nn.Linear):
            groups = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(dim=-1)
            assert bool((groups == 2).all()), name


def test_the_healing_run_gets_the_data_overrides_and_only_them():
    assert data_overrides(["data=files", "data.paths=[a.jsonl]", "+data.seed=1", "database=x", "prune=sparsegpt",
                           "metadata.x=1", "calibration.length=32"]) == ["data=files", "data.paths=[a.jsonl]",
                                                                         "+data.seed=1"]


def test_a_saved_checkpoint_loads_back_with_the_same_forward(bf16_run, tmp_path):
    from bitlaw.deploy.load import load_checkpoint, save_checkpoint

    run_dir, _ = bf16_run
    loaded = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    again = load_checkpoint(save_checkpoint(loaded, tmp_path / "copy.ckpt"))
    assert (again.config, again.recipe, again.tokenizer_path, again.data) == (
        loaded.config, loaded.recipe, loaded.tokenizer_path, loaded.data)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.model(ids), loaded.model(ids))
