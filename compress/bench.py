"""The post-training compression benchmark: every method of ``bitlaw-compress`` on one trained model, in one run.

Usage: ``python -m bitlaw.compress.bench SOURCE [--out DIR] [--sparsities 0.5 0.6 0.7] [--bits 2 3]
[--pv-steps 100] [--heal-tokens 200000] [overrides …]``, where SOURCE is what ``bitlaw-compress`` reads (a run
directory) and the overrides are Hydra overrides for every run (``data.cache_dir=…``, ``calibration.sequences=…``).

Runs, each a ``bitlaw-compress`` run writing its export and report under ``--out``:
magnitude pruning, uniform SparseGPT and scheduled SparseGPT at each sparsity; GPTQ at each bit width followed by
PV-tuning (the report's GPTQ stage is "GPTQ alone", its PV stage "with PV-tuning"); ShortGPT removing 25 % of the
blocks with healing (the loss before healing is "without"). Every loss is on the whole validation split of the data
set, with the same calibration windows for every run. Prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from ..core.config import CONF_DIR
from .cli import compress, data_overrides, plan


def _run(source: str, out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="compress", overrides=[f"source={source}", f"out={out / name}", "force=true",
                                                         *overrides])
    return compress(plan(cfg, data_overrides(overrides)))


def _row(method: str, setting: str, quality: dict[str, Any], size: dict[str, Any], base: float) -> str:
    return (f"| {method} | {setting} | {quality['loss']:.4f} | {quality['loss'] - base:+.4f} | "
            f"{quality['perplexity']:.2f} | {quality['bits_per_byte']:.4f} | {size['n_layer']} | "
            f"{size['bits_per_weight']:.3f} | {size['sparsity']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the trained model (a bitlaw-train run directory, checkpoint or export)")
    parser.add_argument("--out", default="compressed/bench", help="folder for the runs' exports and reports")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], choices=[2, 3, 4])
    parser.add_argument("--pv-steps", type=int, default=100)
    parser.add_argument("--heal-tokens", type=int, default=200_000)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.cache_dir=DIR")
    args = parser.parse_intermixed_args(argv)  # options may sit between the source and the overrides
    out = Path(args.out)
    started = time.perf_counter()
    rows, base = [], None
    for sparsity in args.sparsities:
        percent = round(100 * sparsity)
        for method, allocation in (("magnitude", "uniform"), ("sparsegpt", "uniform"), ("sparsegpt", "scheduled")):
            report = _run(args.source, out, f"{method}{percent}-{allocation}", [
                f"prune={method}", f"prune.sparsity={sparsity}", f"prune.allocation={allocation}", *args.overrides])
            source, final = report["stages"][0], report["stages"][-1]
            if base is None:
                base = source["eval"]["loss"]
                rows.append(_row("none (the trained model)", "", source["eval"], source["size"], base))
            rows.append(_row(f"{method} {allocation}", f"{percent}% sparse", final["eval"], final["size"], base))
    for bits in args.bits:
        report = _run(args.source, out, f"gptq{bits}-pv", [f"gptq=w{bits}", "pv=default",
                                                            f"pv.steps={args.pv_steps}", *args.overrides])
        gptq, tuned = report["stages"][1], report["stages"][2]
        rows.append(_row("GPTQ", f"int{bits}", gptq["eval"], gptq["size"], base))
        best = tuned["info"]["best_step"]
        rows.append(_row("GPTQ + PV-tuning", f"int{bits}, best step {best}/{args.pv_steps}", tuned["eval"],
                         tuned["size"], base))
    report = _run(args.source, out, "shortgpt25-healed", ["shortgpt=default", "shortgpt.fraction=0.25",
                                                          f"shortgpt.heal_tokens={args.heal_tokens}",
                                                          *args.overrides])
    final = report["stages"][-1]
    removed = final["info"]["removed"]
    rows.append(_row("ShortGPT", f"blocks {removed} removed", final["info"]["before_healing"], final["size"], base))
    rows.append(_row("ShortGPT + healing", f"{args.heal_tokens:,} tokens", final["eval"], final["size"], base))
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndevice: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{minutes:.1f} min; source {args.source}; calibration {report['calibration']['sequences']} × "
          f"{report['calibration']['length']} tokens (training split, seed {report['calibration']['seed']}); "
          f"evaluation {report['evaluation']['windows']} windows × {report['evaluation']['seq_len']} tokens "
          "(validation split)\n")
    print("| method | setting | loss | Δ loss | perplexity | bits/byte | blocks | block bits/weight | sparsity |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
