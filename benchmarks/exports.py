"""Every export kind of ``bitlaw-export`` on the default ``tiny`` run: file sizes, and the loss of every inexact path.

    python -m bitlaw.benchmarks.exports [--work DIR] [--recipes R...] [--record-dir DIR | --no-record] [OVERRIDES...]

For each recipe (default: ``bf16``, ``quest_w4``, ``quest_w4z``, ``quest_w4a4``) it trains the default run,
``bitlaw-train quant=<recipe> hydra.run.dir=runs/<recipe> [OVERRIDES]`` in ``--work`` (default
``runs/benchmark-exports``; a finished run there is reused: ``bitlaw-train`` skips it), then writes, with
``bitlaw-export <run> --out exports/<name> --force``, the exports of :func:`exports_of`: native and hf for every
recipe; compressed-tensors at its default width (8 bits for int4, 4 for int4z), with ``--bits 4`` (int4) and with
``--rotation folded`` for the quantized ones. Each command is a fresh process, as a user runs it.

The record (id ``exports``, kind ``measured``) has one row per export: ``model.safetensors`` bytes from the export's
manifest, the bytes of its block-projection tensors (read from the safetensors header: codes, scales and shapes of
every ``*_proj`` of every block), the bf16 bytes of the same weights (2 × their element count), and for
compressed-tensors the checkpoint's and the export's validation losses that the export command measured and
recorded in ``bitlaw.json`` (``measured``). Pass ``OVERRIDES`` after ``--`` when ``--recipes`` precedes them.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.records import HF_FORMAT, MANIFEST_FILE, NATIVE_FORMAT, ExportManifest, RunRecord, read_json_object
from ..models.llama import LlamaConfig, LlamaModel
from .commands import CommandFailed, Finished, run
from .markdown import table
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.exports"
BENCHMARK = "exports"
TITLE = "Export kinds: sizes and the loss of every inexact path"
RECIPES = ("bf16", "quest_w4", "quest_w4z", "quest_w4a4")
TENSOR_FILE = "model.safetensors"
# compressed-tensors options per recipe beyond its default (the narrowest exact width, rotation online): int4's
# requantization to 4 bits, and the rotation folded into the weights for engines without transform support.
CT_OPTIONS = {"quest_w4": (["--bits", "4"], ["--rotation", "folded"]), "quest_w4z": (["--rotation", "folded"],),
              "quest_w4a4": (["--rotation", "folded"],)}
# A block projection's tensors in any export: native (layers.0.mlp.up_proj.weight.codes), Hugging Face and
# compressed-tensors (model.layers.0.mlp.up_proj.weight, ….weight_packed / weight_scale / weight_shape).
_BLOCK_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.\w+_proj\.")


def exports_of(recipe: str) -> list[tuple[str, list[str]]]:
    """``(format, options)`` of every export written for ``recipe``: native and hf, then compressed-tensors at its
    default and with each of :data:`CT_OPTIONS` (recipes with quantized weights only: bf16 has none to pack)."""
    kinds: list[tuple[str, list[str]]] = [("native", []), ("hf", [])]
    if recipe in CT_OPTIONS:
        kinds += [("compressed-tensors", []), *(("compressed-tensors", list(o)) for o in CT_OPTIONS[recipe])]
    return kinds


def export_name(recipe: str, fmt: str, options: list[str]) -> str:
    """The export's folder name: ``quest_w4-compressed-tensors-bits-4``."""
    return "-".join([recipe, fmt, *(option.lstrip("-") for option in options)])


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in the safetensors file ``path``, from its header (an 8-byte little-endian length, then
    JSON with each tensor's ``data_offsets``), without reading the tensors."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0]
            for name, entry in header.items() if name != "__metadata__"}


def block_weight_elements(model: dict[str, Any]) -> int:
    """Weights of the block projections (every ``nn.Linear`` inside a block) of the model ``model`` describes
    (``LlamaConfig.to_dict()``), counted on the meta device."""
    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig.from_dict(model))
    return sum(module.weight.numel() for name, module in llama.named_modules()
               if isinstance(module, nn.Linear) and name.startswith("layers."))


def stored_weights(manifest: ExportManifest) -> str:
    """How the export holds the block weights, from its manifest."""
    quantized = manifest.recipe["weight"]["format"] != "bf16"
    if manifest.format == NATIVE_FORMAT:
        widths = sorted({layer["field_bits"] for layer in (manifest.layers or {}).values()})
        if not widths:
            return "as trained (fp32), exact"
        return f"{'/'.join(map(str, widths))}-bit codes + fp32 row steps, exact"
    if manifest.format == HF_FORMAT:
        return "dequantized to fp32" if quantized else "as trained (fp32)"
    storage = manifest.storage or {}
    weights = "exact" if storage.get("weights_exact") else f"requantized to {storage.get('bits')} bits"
    if storage.get("input_bits"):
        weights += f"; inputs per-token dynamic int{storage['input_bits']}"
    return weights


def export_label(fmt: str, options: list[str], manifest: ExportManifest) -> str:
    """``native``, ``hf``, or ``compressed-tensors W8A4, rotation online`` with the options given."""
    if fmt != "compressed-tensors":
        return fmt
    storage = manifest.storage or {}
    label = (f"compressed-tensors W{storage.get('bits')}A{storage.get('input_bits') or 16}, rotation "
             f"{storage.get('rotation')}")
    return label + (f" (`{' '.join(options)}`)" if options else "")


def export_row(recipe: str, fmt: str, options: list[str], out: Path, finished: Finished) -> dict[str, Any]:
    """The record row of the export written to ``out`` by ``finished``."""
    path = out / MANIFEST_FILE
    manifest = ExportManifest.from_dict(read_json_object(path, "export it again"), str(path))
    blocks = sum(size for name, size in tensor_bytes(out / TENSOR_FILE).items() if _BLOCK_PROJECTION.search(name))
    elements = block_weight_elements(manifest.model)
    measured = manifest.measured or {}
    return {"recipe": recipe, "format": fmt, "options": " ".join(options),
            "export": export_label(fmt, options, manifest), "weights": stored_weights(manifest),
            "file_bytes": manifest.files[TENSOR_FILE].bytes,
            "block_bytes": blocks, "block_elements": elements, "block_bytes_bf16": 2 * elements,
            "checkpoint_loss": measured.get("trained_loss"), "export_loss": measured.get("export_loss"),
            "difference": measured.get("difference"), "windows": measured.get("windows"),
            "loaded_with": measured.get("loaded_with"), "export_command": finished.command}


def train(work: Path, recipe: str, overrides: list[str]) -> dict[str, Any]:
    """Train (or reuse) the run of ``recipe`` in ``work/runs/<recipe>``; what the record says of it."""
    finished = run("bitlaw.train", [f"quant={recipe}", f"hydra.run.dir=runs/{recipe}", *overrides], work)
    skipped = any(line.startswith("bitlaw-train: skipped ") for line in finished.lines())
    record = RunRecord.read(work / "runs" / recipe)
    return {"command": finished.command, "this_command": "reused (already finished)" if skipped else "trained",
            "steps": record.steps, "tokens": record.tokens, "val_loss": record.val_loss}


def measure(work: Path, recipes: list[str], overrides: list[str]) -> BenchmarkRecord:
    """Train every recipe's run in ``work``, write its exports and return the unstamped record."""
    work.mkdir(parents=True, exist_ok=True)
    runs, rows = {}, []
    for recipe in recipes:
        runs[recipe] = train(work, recipe, overrides)
        for fmt, options in exports_of(recipe):
            out = Path("exports") / export_name(recipe, fmt, options)
            finished = run("bitlaw.deploy.export",
                           [f"runs/{recipe}", "--format", fmt, *options, "--out", str(out), "--force"], work)
            rows.append(export_row(recipe, fmt, options, work / out, finished))
    return BenchmarkRecord(BENCHMARK, TITLE, "measured", MODULE, "", rows, {"overrides": overrides, "runs": runs})


def signed(value: float) -> str:
    """A loss difference: ``+0.0017``; below 5e-5 in magnitude with two significant digits (``+2.1e-05``)."""
    if value != 0 and abs(value) < 5e-5:
        return f"{value:+.1e}"
    return f"{value:+.4f}"


def render(record: BenchmarkRecord) -> str:
    """The runs, the sizes of every export and the losses of the measured (compressed-tensors) ones."""
    rows, runs = record.rows, record.notes["runs"]
    overrides = record.notes["overrides"]
    lines = [
        "Each recipe's run: `bitlaw-train quant=<recipe>`"
        + (f" with `{' '.join(overrides)}`" if overrides else " (the default `tiny` run on the embedded corpus)")
        + "; then `bitlaw-export <run> --format <kind> [options]` per export.",
        "",
        table(["recipe", "steps", "tokens", "validation loss", "this command"],
              [[name, f"{r['steps']:,}", f"{r['tokens']:,}", f"{r['val_loss']:.4f}", r["this_command"]]
               for name, r in runs.items()], "lrrrl"),
        "",
    ]
    elements = sorted({row["block_elements"] for row in rows})
    bf16 = (f"{elements[0]:,} block-projection weights, {2 * elements[0]:,} B in bf16" if len(elements) == 1
            else "the block-projection weights of each export's model in bf16")
    lines += [
        f"Sizes in bytes: `{TENSOR_FILE}` as the export's `bitlaw.json` lists it; block projections: the tensors of "
        f"every block's `*_proj` in it (codes or weights, scales, shapes); the ratio is to {bf16}.",
        "",
        table(["recipe", "export", "block weights stored as", TENSOR_FILE, "block projections",
               "vs bf16 block weights"],
              [[row["recipe"], row["export"], row["weights"], f"{row['file_bytes']:,}", f"{row['block_bytes']:,}",
                f"{row['block_bytes'] / row['block_bytes_bf16']:.3f}x"] for row in rows], "lllrrr"),
    ]
    measured = [row for row in rows if row["checkpoint_loss"] is not None]
    if measured:
        windows = "; ".join(sorted({row["windows"] for row in measured}))
        loaded = "; ".join(sorted({row["loaded_with"] for row in measured}))
        lines += [
            "",
            f"Validation loss (nats/token) on {windows}, as each export command measured it and recorded it in the "
            f"export's `bitlaw.json` (`measured`): the checkpoint through bitlaw's forward, the export loaded with "
            f"{loaded}.",
            "",
            table(["recipe", "export", "block weights stored as", "checkpoint", "export", "difference"],
                  [[row["recipe"], row["export"], row["weights"], f"{row['checkpoint_loss']:.4f}",
                    f"{row['export_loss']:.4f}", signed(row["difference"])] for row in measured], "lllrrr"),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """0 on success; 1 when a command failed (its last lines on stderr); 2 for an unknown recipe or an override of
    what the benchmark sets itself (the recipe, the run directory)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs") / "benchmark-exports",
                        help="folder for the runs and exports; finished runs in it are reused (default: %(default)s)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="RECIPE",
                        help=f"recipes to train and export (default: {' '.join(RECIPES)})")
    add_record_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every bitlaw-train run (default: none)")
    args = parser.parse_args(argv)
    unknown = [recipe for recipe in args.recipes if recipe not in RECIPES]
    if unknown:
        print(f"{parser.prog}: --recipes {' '.join(unknown)} is not allowed; allowed: {', '.join(RECIPES)}",
              file=sys.stderr)
        return 2
    bad = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") in ("quant", "run_dir", "hydra.run.dir")]
    if bad:
        print(f"{parser.prog}: the override(s) {' '.join(bad)} are not allowed: the benchmark sets the recipe and the "
              "run directory itself", file=sys.stderr)
        return 2
    try:
        record = measure(args.work, args.recipes, args.overrides)
    except (CommandFailed, ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    record.command = command_line(MODULE, argv)
    path = write_record(record, record_directory(args), versions=("transformers", "compressed-tensors"))
    print(f"exports: {len(record.rows)} exports of {len(args.recipes)} runs; "
          + (f"record {path}" if path else "no record"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
