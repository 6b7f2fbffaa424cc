"""Forward + backward of one Llama block per recipe, eager and compiled, measured side by side in one run.

    python -m bitlaw.benchmarks.block                       # on CUDA: one 800M block at 32 x 512 tokens
    python -m bitlaw.benchmarks.block --quant bf16 quest_w4a4 --no-compile
    python -m bitlaw.benchmarks.block --size tiny           # on the CPU: a tiny block, proves it runs

The block is :class:`bitlaw.models.llama.LlamaBlock` with the model preset's shape (``conf/model/<preset>.yaml``, one
layer), its projections converted to each recipe as training converts them (:class:`RecipeConverter` with its
default filter), fp32 parameters (the master weights) and an fp32 residual-stream input under bf16 autocast, as
``trainer=gpu`` runs it. One step: forward, backward of a fixed random output gradient, gradients cleared. Each
recipe runs eager and, unless ``--no-compile``, under ``torch.compile`` (a compile that fails is reported in its
row, not raised). Medians of ``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` elsewhere.

Each row has the block's ms, its ratio to bf16 in the same mode, the kernel path the quantized layers took, and —
for the 800M block at 16,384 tokens, the shape the estimate models — the estimate's block time at each GEMM
efficiency (the record ``estimate-800m``) and measured / estimated: the first GPU run calibrates the model.
Record: ``block-cuda`` or ``block-cpu`` (kind ``measured``). Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import read_preset
from ..kernels.recipe import load_recipe
from ..models.converter import RecipeConverter
from ..models.llama import LlamaBlock, LlamaConfig, rope_tables
from ..models.quant_linear import QuantLinear
from . import markdown
from .kernels import median_ms
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.block"
RECIPES = ["bf16", "quest_w4a4", "quest_w4a4_g8g8"]
# (model preset or explicit shape, sequences, tokens per sequence): the 800M block at the estimate's 16,384 tokens;
# a tiny block whose widths are multiples of the Hadamard block, for the CPU.
SIZES = {"800m": ({"preset": "800m"}, 32, 512), "tiny": ({"d_model": 256, "n_head": 2}, 2, 64)}
ESTIMATE = Path(__file__).parent / "records" / "estimate-800m.json"


class _OneBlock(nn.Module):
    """One block under ``layers.0`` so that the converter's default filter (the block projections) selects it."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.layers = nn.ModuleList([LlamaBlock(config)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x, cos, sin)


def block_config(size: str) -> tuple[LlamaConfig, int, int]:
    """(one-layer config, sequences, tokens per sequence) of ``size`` (:data:`SIZES`)."""
    shape, sequences, seq_len = SIZES[size]
    fields = dict(shape)
    if "preset" in fields:
        preset = read_preset("model", fields.pop("preset"))
        fields = {key: preset[key] for key in ("d_model", "n_head", "mlp_hidden") if key in preset}
    return LlamaConfig(n_layer=1, max_seq_len=seq_len, **fields), sequences, seq_len


def _backend(module: nn.Module) -> str | None:
    """The kernel path the quantized layers took in the last forward (``triton``, ``reference``, ``mixed``), None
    without quantized layers."""
    kinds = {layer.last_backend.backend for layer in module.modules()
             if isinstance(layer, QuantLinear) and layer.last_backend is not None}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


def measure(recipe_name: str, size: str, compiled: bool, device: torch.device, min_run_time: float
            ) -> dict[str, Any]:
    """One recipe's block step (see the module docstring): ``recipe, mode, tokens, ms`` (None where the compile
    failed, with ``error``), ``backend``."""
    config, sequences, seq_len = block_config(size)
    torch.manual_seed(0)
    block = RecipeConverter(load_recipe(recipe_name)).convert(_OneBlock(config)).to(device)
    cos, sin = (t.to(device) for t in rope_tables(config.head_dim, seq_len, config.rope_theta))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(sequences, seq_len, config.d_model, device=device, generator=gen, requires_grad=True)
    grad = torch.randn(sequences, seq_len, config.d_model, device=device, generator=gen)
    forward = torch.compile(block) if compiled else block

    def step() -> None:
        for p in (x, *block.parameters()):
            p.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = forward(x, cos, sin)
        y.backward(grad)

    row: dict[str, Any] = {"recipe": recipe_name, "mode": "compiled" if compiled else "eager",
                           "tokens": sequences * seq_len, "ms": None, "error": None}
    try:
        row["ms"] = median_ms(step, device, min_run_time)
    except Exception as err:  # noqa: BLE001 - reported in the row: the check goes on with the other recipes
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    row["backend"] = _backend(block)
    return row


def estimated_block_us(size: str, path: Path = ESTIMATE) -> dict[str, list[float]]:
    """``{recipe: [estimated block µs at each GEMM efficiency]}`` (efficiencies ascending: 0.6, 0.7, 0.8) from the
    ``estimate-800m`` record at ``path``, for the size the estimate models (``800m``); empty for any other size or
    without the record."""
    if size != "800m" or not path.is_file():
        return {}
    (record,) = [BenchmarkRecord.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))]
    out: dict[str, dict[float, float]] = {}
    for row in record.rows:
        if row["scope"] == "block":
            out.setdefault(row["recipe"], {})[row["efficiency"]] = row["block_us"]
    return {recipe: [by[e] for e in sorted(by)] for recipe, by in out.items()}


def with_ratios(rows: list[dict[str, Any]], estimate: dict[str, list[float]]) -> list[dict[str, Any]]:
    """``rows`` with ``vs_bf16`` (ms over bf16's in the same mode; None without both), ``estimate_us`` (the
    recipe's estimated block µs per GEMM efficiency; empty where the estimate has no such recipe) and
    ``measured_over_estimate`` (the measured time over each)."""
    base = {row["mode"]: row["ms"] for row in rows if row["recipe"] == "bf16"}
    out = []
    for row in rows:
        ms, reference = row["ms"], base.get(row["mode"])
        estimated = estimate.get(row["recipe"], [])
        out.append({**row, "vs_bf16": ms / reference if ms is not None and reference else None,
                    "estimate_us": estimated,
                    "measured_over_estimate": [ms * 1e3 / us for us in estimated] if ms is not None else []})
    return out


HEADER = ("recipe", "mode", "ms per block", "vs bf16", "kernels", "estimate ms at 0.6 / 0.7 / 0.8",
          "measured / estimate at 0.6 / 0.7 / 0.8")


def cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One row as text, in the columns of :data:`HEADER`."""
    def figures(values: list[float], scale: float) -> str:
        return " / ".join(f"{value * scale:.2f}" for value in values) or "—"

    time = f"{row['ms']:.3f}" if row["ms"] is not None else f"failed: {row['error']}"
    return (row["recipe"], row["mode"], time, "—" if row["vs_bf16"] is None else f"{row['vs_bf16']:.2f}x",
            row["backend"] or "—", figures(row["estimate_us"], 1e-3), figures(row["measured_over_estimate"], 1.0))


def render(record: BenchmarkRecord) -> str:
    """The Markdown body of a ``block-cuda`` / ``block-cpu`` record's section of BENCHMARKS.md."""
    notes = record.notes
    table = markdown.table(HEADER, [cells(row) for row in record.rows], "llrrlrr")
    return (f"Forward + backward of one {notes['size']} Llama block ({notes['config']}), {notes['tokens']:,} tokens "
            f"({notes['sequences']} × {notes['seq_len']}), fp32 parameters and residual input under bf16 autocast; "
            f"medians of {notes['timer']}. `vs bf16`: the block's time over bf16's in the same mode; the estimate "
            "columns: the `estimate-800m` record's block time at each GEMM efficiency and the measured time over "
            f"it (800M only).\n\n{table}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--quant", nargs="+", default=RECIPES, help="quant presets to time (bf16 first for ratios)")
    parser.add_argument("--size", choices=list(SIZES), help="block size (default: 800m on CUDA, tiny elsewhere)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    size = args.size or ("800m" if use_cuda else "tiny")
    config, sequences, seq_len = block_config(size)
    name = torch.cuda.get_device_name() if use_cuda else f"{platform.processor() or platform.machine()} CPU"
    where = name if use_cuda else f"{name}, {torch.get_num_threads()} threads"
    print(f"device: {where}, torch {torch.__version__}; {size} block (d_model {config.d_model}, {config.n_head} "
          f"heads, MLP {config.hidden}), {sequences} x {seq_len} tokens")
    rows = []
    for compiled in [False] if args.no_compile else [False, True]:
        for recipe in args.quant:
            rows.append(measure(recipe, size, compiled, device, args.min_run_time))
            # Each figure as soon as it is measured: a run cut short by a time limit still shows what it had.
            print(f"measured: {recipe} {rows[-1]['mode']}: "
                  f"{rows[-1]['ms'] if rows[-1]['ms'] is not None else rows[-1]['error']} ms", flush=True)
    rows = with_ratios(rows, estimated_block_us(size))
    widths = (16, 9, 12, 8, 10, 22, 22)
    print(" ".join(f"{text:>{width}}" for text, width in zip(HEADER, widths, strict=True)))
    for row in rows:
        print(" ".join(f"{text:>{width}}" for text, width in zip(cells(row), widths, strict=True)))
    record = BenchmarkRecord(
        benchmark=f"block-{device.type}", title=f"One Llama block, forward + backward per recipe ({device.type})",
        kind="measured", module=MODULE, command=command_line(MODULE, argv), rows=rows, device=where,
        notes={"size": size, "config": f"d_model {config.d_model}, {config.n_head} heads, MLP {config.hidden}",
               "sequences": sequences, "seq_len": seq_len, "tokens": sequences * seq_len,
               "timer": "triton.testing.do_bench" if use_cuda else "torch.utils.benchmark",
               "min_run_time": args.min_run_time})
    path = write_record(record, record_directory(args))
    if path is not None:
        print(f"record: {path}")


if __name__ == "__main__":
    main()
