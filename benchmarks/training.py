"""Throughput of the default training run, bf16 vs quantized recipes, measured one after the other in one run.

Usage: ``python -m bitlaw.benchmarks.training [--steps 40] [--quant bf16 quest_w4a4] [overrides …]``. Each recipe
trains the default configuration (``conf/train.yaml``: tiny model, embedded corpus; Hydra overrides such as
``model=30m trainer=gpu`` change it) for ``--steps`` steps in a temporary run directory; tokens/s is taken from the
run record. Writes the record ``training-cpu`` or ``training-cuda`` (``benchmarks.record``), by the device the runs
trained on.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from ..core.config import CONF_DIR
from ..core.records import RunRecord
from ..train.cli import train
from ..train.config import register_configs
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.training"


def _backend(record: RunRecord) -> str | None:
    """The kernel path the run's quantized layers took (``triton``, ``reference``, ``mixed``), None without any."""
    kinds = {choice["backend"] for choice in record.backends.values()}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


def row_of(quant: str, record: RunRecord) -> dict[str, Any]:
    """The record row of one recipe's run: ``recipe, tokens_per_s, mfu`` (None without a known peak), ``val_loss``
    (nats/token on training's validation windows), ``backend``."""
    mfu = record.throughput.mfu if record.throughput is not None else None
    return {"recipe": quant, "tokens_per_s": record.tokens_per_s, "mfu": mfu, "val_loss": record.val_loss,
            "backend": _backend(record)}


def table_lines(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(recipe, tokens/s, ratio to the first recipe)`` per row, as text."""
    base = rows[0]["tokens_per_s"]
    return [(row["recipe"], f"{row['tokens_per_s']:.0f}", f"{row['tokens_per_s'] / base:.2f}x") for row in rows]


def render(record: BenchmarkRecord) -> str:
    """The Markdown body of a ``training-cpu`` / ``training-cuda`` record's section of BENCHMARKS.md."""
    notes, rows = record.notes, record.rows
    lines = [f"| recipe | tokens/s | vs {rows[0]['recipe']} | kernels |", "|---|---:|---:|---|"]
    lines += [f"| {recipe} | {speed} | {ratio} | {row['backend'] or '—'} |"
              for (recipe, speed, ratio), row in zip(table_lines(rows), rows, strict=True)]
    overrides = " ".join(notes["overrides"]) or "none"
    return (f"{notes['steps']} steps of {notes['global_batch']} × {notes['seq_len']} tokens per recipe, one after the "
            f"other in one process (model N = {notes['params_non_embedding']:,}; overrides: {overrides}); tokens/s "
            "from each run's record.\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per recipe")
    parser.add_argument("--quant", nargs="+", default=["bf16", "quest_w4a4"], help="quant presets to compare")
    add_record_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer=gpu")
    args = parser.parse_intermixed_args(argv)
    overrides_taken = [quant for quant in args.quant if "=" in quant]
    if overrides_taken:
        parser.error(f"--quant {' '.join(args.quant)}: {', '.join(overrides_taken)} is not a quant preset but a Hydra "
                     "override; allowed: preset names (conf/quant); give overrides before --quant")
    register_configs()
    results: dict[str, RunRecord] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            overrides = [f"quant={quant}", f"trainer.max_steps={args.steps}", "tokens=null", f"run_dir={tmp}/{quant}",
                         "trainer.enable_progress_bar=false", f"val_every={args.steps}", "val_batches=1",
                         f"ckpt_every={args.steps}", *args.overrides]
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                cfg = compose(config_name="train", overrides=overrides)
            train(cfg)
            results[quant] = RunRecord.read(Path(tmp) / quant)
    first = results[args.quant[0]]
    device = first.device or "cpu"
    where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if device == "cpu" else device
    print(f"\ndevice: {where}, torch {torch.__version__}; {args.steps} steps of {first.global_batch} x "
          f"{first.seq_len} tokens")
    rows = [row_of(quant, record) for quant, record in results.items()]
    print(f"{'recipe':>12} {'tokens/s':>10} {'vs ' + args.quant[0]:>10}")
    for recipe, speed, ratio in table_lines(rows):
        print(f"{recipe:>12} {speed:>10} {ratio:>10}")
    record = BenchmarkRecord(
        benchmark="training-cpu" if device == "cpu" else "training-cuda",
        title=f"Training tokens/s per recipe ({'CPU' if device == 'cpu' else 'GPU'})", kind="measured",
        module=MODULE, command=command_line(MODULE, argv), rows=rows,
        notes={"steps": args.steps, "global_batch": first.global_batch, "seq_len": first.seq_len,
               "params_non_embedding": first.params_non_embedding, "model_preset": first.model_preset,
               "world_size": first.world_size, "overrides": args.overrides},
        device=where)  # the device the runs trained on, which need not be the one this machine has
    path = write_record(record, record_directory(args))
    if path is not None:
        print(f"record: {path}")


if __name__ == "__main__":
    main()
