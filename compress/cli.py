"""``bitlaw-compress``: post-training compression of a trained model, stage by stage, into a native export + report.

    bitlaw-compress source=runs/tiny-bf16-seed0 prune=sparsegpt prune.sparsity=0.7 prune.allocation=scheduled
    bitlaw-compress source=runs/tiny-bf16-seed0 gptq=w2 pv=default out=compressed/tiny-w2-pv
    bitlaw-compress source=runs/tiny-bf16-seed0 shortgpt=default shortgpt.heal_tokens=200000

Steps, as a reader can follow them in :func:`compress`: check the configuration (:func:`plan`), check the output
directory, load the source as a LlamaModel, check what depends on the model (blocks to remove, layers GPTQ can
compress), load the data set and draw the calibration windows from its training split — every check before any
compression, so bad input ends with one line and nothing written (exit status 2). Then evaluate on the validation
split, run the selected stages in order (shortgpt → prune, with gptq in the same sweep → gptq → pv), evaluating
after each, and write the native export with ``report.json``, ``report.md`` and ``sparsity.png`` into ``out``,
which appears only once complete.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ..core.config import CONF_DIR
from ..core.records import DataSource, RunSummary
from ..data.cli import resolved_data_config
from ..data.config import DataConfig
from ..data.shards import PreparedData, config_hash, prepare_data
from ..deploy.evaluate import evaluate
from ..deploy.load import (
    LoadedModel,
    check_device,
    load_checkpoint,
    resolve_source,
    save_checkpoint,
    training_run,
)
from ..deploy.native import TENSOR_FILE, compression_fields, export_native
from ..deploy.staging import check_out
from ..models.frozen_linear import frozen_layers
from ..models.quant_linear import QuantLinear
from . import stages
from .calibration import Calibration, draw
from .report import model_size, write_report
from .settings import STAGES, check_group, check_stages
from .source import load_source

PROG = "bitlaw-compress"


@dataclass
class Plan:
    """A checked configuration: everything :func:`compress` needs before it loads anything."""

    source: Path
    out: Path
    force: bool
    device: torch.device
    seed: int
    chunk_size: int
    sequences: int
    length: int
    eval_seq_len: int | None
    eval_batch_size: int
    eval_max_batches: int | None
    selected: dict[str, dict[str, Any] | None]
    data: DataConfig
    data_overrides: list[str]  # the command line's data=… and data.…=… overrides, for a healing run

    @property
    def stage_names(self) -> list[str]:
        return [name for name in STAGES if self.selected[name]]


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= 1{' or null' if allow_none else ''}")


def plan(cfg: DictConfig, data_overrides: list[str] = ()) -> Plan:
    """Check every setting that needs neither the model nor data; ValueError naming the first bad one."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    if raw.get("source") in (None, "???"):
        raise ValueError("source is required: source=PATH (a bitlaw checkpoint or run directory, a native export, "
                         "or a Hugging Face Llama directory)")
    source = resolve_source(to_absolute_path(str(raw["source"])))
    selected = {name: (check_group(name, dict(raw[name])) if raw.get(name) is not None else None)
                for name in STAGES}
    check_stages(selected)
    if not isinstance(raw["seed"], int) or isinstance(raw["seed"], bool) or raw["seed"] < 0:
        raise ValueError(f"seed={raw['seed']!r} is not allowed; allowed: an integer >= 0")
    _positive_int("chunk_size", raw["chunk_size"])
    _positive_int("calibration.sequences", raw["calibration"]["sequences"])
    _positive_int("calibration.length", raw["calibration"]["length"])
    _positive_int("evaluation.seq_len", raw["evaluation"]["seq_len"], allow_none=True)
    _positive_int("evaluation.batch_size", raw["evaluation"]["batch_size"])
    _positive_int("evaluation.max_batches", raw["evaluation"]["max_batches"], allow_none=True)
    if not isinstance(raw["force"], bool):
        raise ValueError(f"force={raw['force']!r} is not allowed; allowed: true or false")
    stem = Path(str(raw["source"]).rstrip("/")).name.removesuffix(".ckpt")
    out = Path(to_absolute_path(str(raw["out"]))) if raw.get("out") else Path(to_absolute_path(
        f"compressed/{stem}-{'-'.join(_tag(name, selected[name]) for name in STAGES if selected[name])}"))
    return Plan(source=source, out=out, force=raw["force"], device=check_device(str(raw["device"]), "device"),
                seed=raw["seed"], chunk_size=raw["chunk_size"], sequences=raw["calibration"]["sequences"],
                length=raw["calibration"]["length"], eval_seq_len=raw["evaluation"]["seq_len"],
                eval_batch_size=raw["evaluation"]["batch_size"], eval_max_batches=raw["evaluation"]["max_batches"],
                selected=selected, data=resolved_data_config(cfg.data), data_overrides=list(data_overrides))


def _tag(name: str, settings: dict[str, Any]) -> str:
    """A short name of a stage for directory names and the report (``sparsegpt70-scheduled``, ``gptq-int2``)."""
    if name == "shortgpt":
        return f"shortgpt{settings['blocks']}" if settings["blocks"] else f"shortgpt{round(100 * settings['fraction'])}"
    if name == "prune":
        amount = settings["nm"].replace(":", "of") if settings["nm"] else f"{round(100 * settings['sparsity'])}"
        return f"{settings['method']}{amount}-{settings['allocation']}"
    if name == "gptq":
        return f"gptq-{settings['format']}"
    return f"pv{settings['steps']}"


def check_model(run: Plan, loaded: LoadedModel) -> None:
    """What depends on the model, before any data is read: the blocks ShortGPT removes, the layers GPTQ and
    pruning change (high precision), the layers PV-tuning tunes (quantized), healing (a trainable model)."""
    model, selected = loaded.model, run.selected
    frozen = frozen_layers(model)
    if selected["shortgpt"]:
        stages.blocks_to_remove(selected["shortgpt"], len(model.layers))
        if selected["shortgpt"]["heal_tokens"] and frozen:
            raise ValueError(f"shortgpt.heal_tokens: {run.source} holds frozen quantized layers (a compressed "
                             "model), which bitlaw-train cannot fine-tune; allowed: heal_tokens=0")
    changes_weights = selected["prune"] or selected["gptq"]
    if changes_weights:
        compressed = [name for name, m in model.named_modules() if name.startswith("layers.")
                      and ((isinstance(m, QuantLinear) and m.recipe.compressed) or name in frozen)]
        if compressed:
            what = "prune" if selected["prune"] else "gptq"
            raise ValueError(f"{what}: the block projections of {run.source} are already quantized (recipe "
                             f"{loaded.recipe.name!r}, e.g. {compressed[0]}); pruning and GPTQ start from "
                             "high-precision layers (a bf16 recipe). Allowed here: shortgpt, pv")
    if selected["gptq"]:
        stages.gptq_recipe(selected["gptq"], loaded.recipe)
    if selected["pv"] and not selected["gptq"] and not (loaded.recipe.weight.quantized or frozen):
        raise ValueError(f"pv: {run.source} has no quantized layer (recipe {loaded.recipe.name!r}); select gptq=w2 "
                         "(or w3, w4) before it, or start from a quantization-aware-trained model")
    unsupported = compression_fields(loaded.recipe.weight)
    if selected["pv"] and not selected["gptq"] and unsupported:
        raise ValueError(f"pv: recipe {loaded.recipe.name!r} has weight {', '.join(unsupported)}: PV-tuning needs "
                         "codes with one step per row")


def load_data(run: Plan, loaded: LoadedModel) -> tuple[PreparedData, list[str]]:
    """The prepared data set (prepared now if needed, as bitlaw-train does) and notes for the user. ValueError
    when its vocabulary does not fit the model."""
    data = prepare_data(run.data, progress=False)
    if data.vocab_size > loaded.config.vocab_size:
        raise ValueError(f"data set {data.directory} has {data.vocab_size} token ids, more than the model's "
                         f"vocab_size={loaded.config.vocab_size}: the model was not trained with its tokenizer; "
                         "choose its data set with data=…")
    notes = []
    trained_on = loaded.data.config_hash if loaded.data else None
    if trained_on and trained_on != config_hash(run.data):
        notes.append(f"the model was trained on data set {loaded.data.directory}; calibrating and evaluating "
                     f"on {data.directory}")
    return data, notes


def _evaluate(model: torch.nn.Module, data: PreparedData, seq_len: int, run: Plan) -> dict[str, Any]:
    result = evaluate(model, data.val_tokens, seq_len, run.eval_batch_size, run.eval_max_batches,
                      data.load_tokenizer())
    return {key: result[key] for key in ("loss", "perplexity", "bits_per_byte", "tokens", "windows")}


def heal(loaded: LoadedModel, settings: dict[str, Any], run: Plan, seq_len: int, workdir: Path) -> LoadedModel:
    """Fine-tune ``loaded`` (a trainable model: plain or QuantLinear layers) for ``heal_tokens`` tokens by a
    ``bitlaw-train`` run started from it (``init_from``) on the same data; returns the healed model."""
    checkpoint = save_checkpoint(loaded, workdir / "pruned.ckpt")
    run_dir = workdir / "heal"
    command = [sys.executable, "-m", "bitlaw.train", f"init_from={checkpoint}", f"tokens={settings['heal_tokens']}",
               f"optim.lr={settings['heal_lr']}", f"seq_len={seq_len}", f"run_dir={run_dir}",
               f"hydra.run.dir={run_dir}", f"seed={run.seed}", "trainer.enable_progress_bar=false",
               *(["trainer=gpu"] if run.device.type == "cuda" else []), *run.data_overrides]
    print(f"healing: {' '.join(command[2:])}", flush=True)
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        tail = "\n".join((finished.stderr or finished.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"the healing run (bitlaw-train) failed with exit status {finished.returncode}:\n{tail}")
    healed = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return replace(loaded, model=healed.model.to(run.device))


def compress(run: Plan) -> dict[str, Any]:
    """Run the plan; returns the report (also written into ``run.out``)."""
    check_out(run.out, run.force, run.source)
    loaded = load_source(run.source)
    check_model(run, loaded)
    data, notes = load_data(run, loaded)
    trained = training_run(loaded.source)
    seq_len = run.eval_seq_len or (trained.seq_len if trained else None) or run.length
    for name, value in (("calibration.length", run.length), ("evaluation seq_len", seq_len)):
        if value > loaded.config.max_seq_len:
            raise ValueError(f"{name}={value} is longer than the model's max_seq_len={loaded.config.max_seq_len}")
    selection = run.selected["pv"]["selection_sequences"] if run.selected["pv"] else 0
    windows: Calibration = draw(data.train_tokens, run.sequences, run.length, run.seed, selection)
    for note in notes:
        print(f"note: {note}")

    model = loaded.model.to(run.device)
    calibration, selection_windows = windows.calibration.to(run.device), windows.selection.to(run.device)
    recipe = loaded.recipe
    report_stages = [{"stage": "source", "settings": None, "seconds": 0.0,
                      "eval": _evaluate(model, data, seq_len, run), "size": model_size(model), "info": None}]
    _print_stage(report_stages[-1])
    selected = run.selected
    for name in run.stage_names:
        if name == "gptq" and selected["prune"] and selected["prune"]["method"] == "sparsegpt":
            continue  # quantized in the pruning sweep
        start = time.perf_counter()
        settings = selected[name]
        if name == "shortgpt":
            info = stages.shortgpt(model, calibration, settings, run.chunk_size)
            if settings["heal_tokens"]:
                info["before_healing"] = _evaluate(model, data, seq_len, run)
                loaded_now = replace(loaded, model=model, config=model.config, recipe=recipe)
                with tempfile.TemporaryDirectory(prefix="bitlaw-heal-") as workdir:
                    model = heal(loaded_now, settings, run, seq_len, Path(workdir)).model
                info["healed_tokens"] = settings["heal_tokens"]
        elif name == "prune":
            info, frozen_recipe = stages.prune(model, calibration, settings, selected["gptq"], recipe,
                                               run.chunk_size)
            recipe = frozen_recipe or recipe
        elif name == "gptq":
            info, recipe = stages.gptq(model, calibration, settings, recipe, run.chunk_size)
        else:
            info = stages.pv(model, calibration, selection_windows, settings)
        label = _tag(name, settings) + ("+" + _tag("gptq", selected["gptq"]) if name == "prune" and selected["gptq"]
                                        and settings["method"] == "sparsegpt" else "")
        report_stages.append({"stage": label, "settings": settings, "seconds": time.perf_counter() - start,
                              "eval": _evaluate(model, data, seq_len, run), "size": model_size(model),
                              "info": info})
        _print_stage(report_stages[-1])

    result = replace(loaded, model=model.cpu(), config=model.config, recipe=recipe,
                     data=DataSource(str(data.directory), data.meta["config_hash"]), tokenizer_path=data.tokenizer_path)
    report = {"source": str(run.source), "data": str(data.directory),
              "calibration": {"sequences": run.sequences, "length": run.length, "seed": run.seed,
                              "windows_in_training_split": windows.windows},
              "evaluation": {"seq_len": seq_len, "windows": report_stages[0]["eval"]["windows"],
                             "batch_size": run.eval_batch_size},
              "recipe": recipe.to_dict(), "stages": report_stages, "file_bytes": None, "out": str(run.out)}
    # What bitlaw-eval reads from an export: the data set and the window length the report evaluated with.
    summary = RunSummary(seq_len=seq_len, data=result.data)

    def add_report(staging: Path) -> None:
        report["file_bytes"] = (staging / TENSOR_FILE).stat().st_size
        write_report(staging, report)

    export_native(result, run.out, run.force, extra={"compressed": {
        "stages": [s["stage"] for s in report_stages[1:]], "source": str(run.source)}, "run": summary},
        write_extra=add_report)
    return report


def _print_stage(stage: dict[str, Any]) -> None:
    quality, size = stage["eval"], stage["size"]
    bpb = "" if quality["bits_per_byte"] is None else f", {quality['bits_per_byte']:.4f} bits/byte"
    print(f"{stage['stage']}: loss {quality['loss']:.4f} nats/token (perplexity {quality['perplexity']:.2f}{bpb}); "
          f"{size['n_layer']} blocks, {size['bits_per_weight']:.3f} bits/weight, sparsity {size['sparsity']:.3f}, "
          f"{size['bytes']:,} bytes; {stage['seconds']:.1f} s", flush=True)


def data_overrides(overrides: list[str]) -> list[str]:
    """The ``data=…`` and ``data.…=…`` items of Hydra ``overrides`` (a healing run must see the same data)."""
    return [item for item in overrides if re.match(r"[+~]*data(=|\.)", item)]


def _command_line_overrides() -> list[str]:
    """This command line's Hydra overrides; none when not run under Hydra (a test composing the config)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="compress")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; bad input exits 2 with one line on stderr and nothing written."""
    try:
        report = compress(plan(cfg, data_overrides(_command_line_overrides())))
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    final = report["stages"][-1]
    print(f"wrote {report['out']}: {report['file_bytes']:,} bytes of {TENSOR_FILE}; "
          f"report.md, report.json, sparsity.png; final loss {final['eval']['loss']:.4f}")


if __name__ == "__main__":
    main()
