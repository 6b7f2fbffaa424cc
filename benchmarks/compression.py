"""The post-training compression benchmark: every method of ``bitlaw-compress`` on one trained model, in one run.

Usage: ``python -m bitlaw.benchmarks.compression SOURCE [--out DIR] [--sparsities 0.5 0.6 0.7] [--bits 2 3]
[--pv-steps 100] [--heal-tokens 200000] [overrides …]``, where SOURCE is what ``bitlaw-compress`` reads (a run
directory) and the overrides are Hydra overrides for every run (``data.cache_dir=…``, ``calibration.sequences=…``).

Runs, each a ``bitlaw-compress`` run writing its export and report under ``--out``:
magnitude pruning, uniform SparseGPT and scheduled SparseGPT at each sparsity; GPTQ at each bit width followed by
PV-tuning (the report's GPTQ stage is "GPTQ alone", its PV stage "with PV-tuning"); ShortGPT removing 25 % of the
blocks with healing (the loss before healing is "without"). Every loss is on the whole validation split of the data
set, with the same calibration windows for every run. Prints a Markdown table and writes the record
``compression`` (``benchmarks.record``), with the source model's run record when SOURCE is a run directory.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from ..compress.cli import compress, data_overrides, plan
from ..core.config import CONF_DIR
from ..core.records import RUN_RECORD_FILE, RunRecord
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.compression"
HEADER = ("| method | setting | loss | Δ loss | perplexity | bits/byte | blocks | block bits/weight | sparsity |\n"
          "|---|---|---|---|---|---|---|---|---|")


def quoted(value: object) -> str:
    """``value`` as a quoted Hydra override value: a path may hold ``=`` (bitlaw-train names run directories by their
    overrides, ``runs/tiny-bf16-seed0--tokens=1280000``), which Hydra's grammar refuses unquoted."""
    return "'" + str(value).replace("'", "\\'") + "'"


def _run(source: str, out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="compress", overrides=[f"source={quoted(source)}", f"out={quoted(out / name)}",
                                                         "force=true", *overrides])
    return compress(plan(cfg, data_overrides(overrides)))


def _row(method: str, setting: str, quality: dict[str, Any], size: dict[str, Any], **parameters: Any
         ) -> dict[str, Any]:
    """One record row: the method, its setting (text) and its parameters, the quality on the validation split
    (``loss`` nats/token, ``perplexity``, ``bits_per_byte``) and the size (``blocks``, ``bits_per_weight`` of the
    block weights as stored, ``sparsity``)."""
    return {"method": method, "setting": setting, **parameters, "loss": quality["loss"],
            "perplexity": quality["perplexity"], "bits_per_byte": quality["bits_per_byte"],
            "blocks": size["n_layer"], "bits_per_weight": size["bits_per_weight"], "sparsity": size["sparsity"]}


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the rows; Δ loss is against the first row (the trained model)."""
    base = rows[0]["loss"]
    lines = [f"| {row['method']} | {row['setting']} | {row['loss']:.4f} | {row['loss'] - base:+.4f} | "
             f"{row['perplexity']:.2f} | {row['bits_per_byte']:.4f} | {row['blocks']} | "
             f"{row['bits_per_weight']:.3f} | {row['sparsity']:.3f} |" for row in rows]
    return "\n".join([HEADER, *lines])


def source_run(source: str) -> dict[str, Any] | None:
    """What the source model's run record says (N, training tokens, val_loss on training's validation windows, code
    version, recipe, model preset) when ``source`` is a run directory; None otherwise (a checkpoint, an export)."""
    if not (Path(source) / RUN_RECORD_FILE).is_file():
        return None
    record = RunRecord.read(source)
    return {"params_non_embedding": record.params_non_embedding, "tokens": record.tokens,
            "val_loss": record.val_loss, "code_version": record.code_version, "recipe": record.recipe_name,
            "model_preset": record.model_preset}


def render(record: BenchmarkRecord) -> str:
    """The Markdown body of the ``compression`` record's section of BENCHMARKS.md."""
    notes = record.notes
    calibration, evaluation, run = notes["calibration"], notes["evaluation"], notes["source_run"]
    if run is None:
        model = f"The source, `{notes['source']}`, is not a run directory (no run record)."
    else:
        model = (f"The source, `{notes['source']}`: N = {run['params_non_embedding']:,} non-embedding parameters, "
                 f"{run['tokens']:,} training tokens, recipe {run['recipe']}, trained at code version "
                 f"{run['code_version'] or 'unknown'}; its run record's val_loss {run['val_loss']:.4f} (training's "
                 "validation windows).")
    return (f"{model} Calibration: {calibration['sequences']} × {calibration['length']} tokens of the training split "
            f"(seed {calibration['seed']}), the same for every run; every loss on {evaluation['windows']} windows × "
            f"{evaluation['seq_len']} tokens of the validation split; Δ loss against the trained model. "
            f"{notes['runs']} `bitlaw-compress` runs, {notes['minutes']:.1f} min.\n\n{table(record.rows)}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the trained model (a bitlaw-train run directory, checkpoint or export)")
    parser.add_argument("--out", default="compressed/bench", help="folder for the runs' exports and reports")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], choices=[2, 3, 4])
    parser.add_argument("--pv-steps", type=int, default=100)
    parser.add_argument("--heal-tokens", type=int, default=200_000)
    add_record_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.cache_dir=DIR")
    args = parser.parse_intermixed_args(argv)  # options may sit between the source and the overrides
    out = Path(args.out)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    runs = 0
    for sparsity in args.sparsities:
        percent = round(100 * sparsity)
        for method, allocation in (("magnitude", "uniform"), ("sparsegpt", "uniform"), ("sparsegpt", "scheduled")):
            report = _run(args.source, out, f"{method}{percent}-{allocation}", [
                f"prune={method}", f"prune.sparsity={sparsity}", f"prune.allocation={allocation}", *args.overrides])
            runs += 1
            source, final = report["stages"][0], report["stages"][-1]
            if not rows:
                rows.append(_row("none (the trained model)", "", source["eval"], source["size"]))
            rows.append(_row(f"{method} {allocation}", f"{percent}% sparse", final["eval"], final["size"],
                             target_sparsity=sparsity))
    for bits in args.bits:
        report = _run(args.source, out, f"gptq{bits}-pv", [f"gptq=w{bits}", "pv=default",
                                                            f"pv.steps={args.pv_steps}", *args.overrides])
        runs += 1
        gptq, tuned = report["stages"][1], report["stages"][2]
        rows.append(_row("GPTQ", f"int{bits}", gptq["eval"], gptq["size"], bits=bits))
        best = tuned["info"]["best_step"]
        rows.append(_row("GPTQ + PV-tuning", f"int{bits}, best step {best}/{args.pv_steps}", tuned["eval"],
                         tuned["size"], bits=bits, best_step=best, pv_steps=args.pv_steps))
    report = _run(args.source, out, "shortgpt25-healed", ["shortgpt=default", "shortgpt.fraction=0.25",
                                                          f"shortgpt.heal_tokens={args.heal_tokens}",
                                                          *args.overrides])
    runs += 1
    final = report["stages"][-1]
    removed = final["info"]["removed"]
    rows.append(_row("ShortGPT", f"blocks {removed} removed", final["info"]["before_healing"], final["size"],
                     removed=removed))
    rows.append(_row("ShortGPT + healing", f"{args.heal_tokens:,} tokens", final["eval"], final["size"],
                     removed=removed, heal_tokens=args.heal_tokens))
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndevice: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{minutes:.1f} min; source {args.source}; calibration {report['calibration']['sequences']} × "
          f"{report['calibration']['length']} tokens (training split, seed {report['calibration']['seed']}); "
          f"evaluation {report['evaluation']['windows']} windows × {report['evaluation']['seq_len']} tokens "
          "(validation split)\n")
    print(table(rows))
    record = BenchmarkRecord(
        benchmark="compression", title="Post-training compression of a trained model", kind="measured",
        module=MODULE, command=command_line(MODULE, argv), rows=rows,
        notes={"source": args.source, "source_run": source_run(args.source), "out": args.out, "runs": runs,
               "minutes": minutes, "calibration": {key: report["calibration"][key]
                                                   for key in ("sequences", "length", "seed")},
               "evaluation": {key: report["evaluation"][key] for key in ("windows", "seq_len")},
               "overrides": args.overrides})
    path = write_record(record, record_directory(args))
    if path is not None:
        print(f"record: {path}")


if __name__ == "__main__":
    main()
