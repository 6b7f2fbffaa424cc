"""Throughput of the default CPU training run, bf16 vs quantized recipes, measured one after the other in one run.

Usage: ``python -m bitlaw.train.bench [--steps 40] [--quant bf16 quest_w4a4]``. Each recipe trains the default
configuration (``conf/train.yaml``: tiny model, embedded corpus) for ``--steps`` steps in a temporary run
directory; tokens/s is taken from the run record. Record the table in BENCHMARKS.md (device, date, commit).
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch
from hydra import compose, initialize_config_dir

from ..core.config import CONF_DIR
from .cli import train
from .config import register_configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per recipe")
    parser.add_argument("--quant", nargs="+", default=["bf16", "quest_w4a4"], help="quant presets to compare")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer=gpu")
    args = parser.parse_args(argv)
    register_configs()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            overrides = [f"quant={quant}", f"trainer.max_steps={args.steps}", "tokens=null", f"run_dir={tmp}/{quant}",
                         "trainer.enable_progress_bar=false", f"val_every={args.steps}", "val_batches=1",
                         f"ckpt_every={args.steps}", *args.overrides]
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                cfg = compose(config_name="train", overrides=overrides)
            results[quant] = train(cfg)
    first = results[args.quant[0]]
    base = first["tokens_per_s"]
    print(f"\ndevice: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.steps} steps of {first['global_batch']} x {first['seq_len']} tokens")
    print(f"{'recipe':>12} {'tokens/s':>10} {'vs ' + args.quant[0]:>10}")
    for quant, record in results.items():
        print(f"{quant:>12} {record['tokens_per_s']:>10.0f} {record['tokens_per_s'] / base:>9.2f}x")


if __name__ == "__main__":
    main()
