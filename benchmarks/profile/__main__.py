"""Static GPU profile of the Triton kernels: compiled ahead of time for Hopper (sm_90a) and Ampere (sm_80) on the CPU.

    python -m bitlaw.benchmarks.profile                  # the tables, both targets, and the two records
    python -m bitlaw.benchmarks.profile --json out.json  # also every figure as JSON

No GPU is needed (``sass``). For every configuration the code can launch (``variants``) — each tile configuration
the GEMM autotuner may select, and each variant of the fixed-configuration kernels that the presets use — the table
reports, per loop of the kernel (or its whole body when it has none):

- ``regs``, ``stack`` (bytes of local memory per thread: spills), ``smem`` (KiB, static + dynamic);
- ``instr``: SASS instructions per iteration, ``mma``: the tensor-core instructions among them (wgmma ``HGMMA`` /
  ``IGMMA`` on sm_90a, ``HMMA`` / ``IMMA`` on sm_80), ``async``: asynchronous copies into shared memory
  (``LDGSTS`` = cp.async, ``UTMALDG`` = TMA), ``ldg vec/scalar``: global loads of 64/128 bits vs narrower ones;
- the issue-slot model of docs/kernels.md §2: ``issue`` = instructions × warps / 4 cycles per iteration (four
  schedulers per SM, one warp-instruction each per cycle), ``tensor`` = the iteration's MMA operations / the SM's
  dense tensor-core rate; ``issue/tensor`` ≤ 1 means the tensor cores, not instruction issue, bound the loop.
  Memory-bound kernels report ``instr/B``: thread-instructions per input byte and per byte moved (read or
  written); the layer estimate's H100 issues about 10.3 per byte of HBM traffic at its 3.0 TB/s, so a pass whose
  instructions per byte moved stay below that is memory-bound.

An integer argument equal to 1 is compiled as the constant 1, as Triton specializes it at every launch: the unit
column strides of the contiguous gradients the backward kernels read (so their loads vectorize as they will).

Then the same model estimates (``estimate``) the forward + backward of each projection shape of the 800M block
and of the whole block against ``nn.Linear`` in bf16 (docs/kernels.md §3). All of it is an estimate from compiled
code, not a measurement. Records (``benchmarks.record``): ``profile`` (kind ``compiled``: one row per loop of each
compiled configuration) and ``estimate-800m`` (kind ``estimated``: the layer and block estimates, with the
assumptions in its notes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..options import add_record_arguments, record_directory
from ..record import BenchmarkRecord, command_line, write_record
from .estimate import BLOCK_PROJECTIONS, SETTINGS, Gpu, assumptions, block_estimate
from .sass import Profile, nvidia_tools, run_profile
from .variants import TARGETS

COMMAND = "bitlaw.benchmarks.profile"
MODULE = "bitlaw.benchmarks.profile.__main__"  # where render() lives: the generator of BENCHMARKS.md imports it


# ---- the compiled profile: one row per loop ----

def profile_rows(profiles: list[Profile]) -> list[dict[str, Any]]:
    """One flat row per loop of each compiled variant (one row, ``loop`` None, for a variant that did not compile):
    the variant's ``kernel, label, target, num_warps, num_stages, gemm, error``, its ``registers``, ``stack`` and
    ``shared`` (bytes), ``total_instructions_per_input_byte`` (all loops, memory-bound kernels), and the loop's
    fields (``loop``: its name; ``instructions``, ``mma`` …, see ``sass.Loop``)."""
    rows = []
    for item in profiles:
        base = {"kernel": item.kernel, "label": item.label, "target": item.target, "num_warps": item.num_warps,
                "num_stages": item.num_stages, "gemm": item.gemm, "error": item.error, "registers": item.registers,
                "stack": item.stack, "shared": item.shared,
                "total_instructions_per_input_byte": item.instructions_per_input_byte}
        if not item.loops:
            rows.append({**base, "loop": None})
        for loop in item.loops:
            figures = asdict(loop)
            rows.append({**base, "loop": figures.pop("name"), **figures})
    return rows


def _profile_line(row: dict[str, Any]) -> str:
    if row["error"]:
        return (f"| {row['kernel']} | {row['label']} | {row['target']} | {row['num_warps']}/{row['num_stages']} | "
                f"compile error: {row['error']} |||||||||")
    mma = ", ".join(f"{count}×{op}" for op, count in row["mma"].items()) or "—"
    ratio = f"{row['issue_cycles'] / row['tensor_cycles']:.2f}" if row["tensor_cycles"] else "—"
    per_byte = "—"
    if row["instructions_per_input_byte"] is not None and not row["gemm"]:
        per_byte = f"{row['instructions_per_input_byte']:.1f} / {row['instructions_per_byte_moved']:.1f}"
    return (f"| {row['kernel']} | {row['label']} | {row['target']} | {row['num_warps']}/{row['num_stages']} | "
            f"{row['registers']} | {row['stack']} | {row['shared'] / 1024:.0f} | {row['loop']}: "
            f"{row['instructions']} | {mma} | {row['async_copies']} | {row['vector_loads']}/{row['scalar_loads']} | "
            f"{ratio} | {per_byte} |")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The profile as a Markdown table: one line per :func:`profile_rows` row."""
    lines = ["| kernel | variant | target | warps/stages | regs | stack B | smem KiB | instr/iter | mma/iter | async | "
             "ldg vec/scalar | issue/tensor | instr/B in / moved |",
             "|---|---|---|---|---:|---:|---:|---|---|---:|---|---:|---:|"]
    return "\n".join(lines + [_profile_line(row) for row in rows])


# ---- the estimate: one row per projection shape and per block ----

def estimate_rows(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per :func:`~.estimate.block_estimate`: a ``layer`` row per projection shape (``m, k, n``, the
    ``projections`` of that shape, per-projection totals ``quantized_us`` / ``nn_linear_us``, ``ratio``, and every
    pass in ``quantized_passes_us`` / ``nn_linear_passes_us``), then a ``block`` row (sums over the seven
    projections and their ratio). Times in µs per step."""
    rows = []
    for block in blocks:
        for layer in block["layers"]:
            m, k, n = layer["shape"]
            rows.append({"scope": "layer", "bits": block["bits"], "backward": block["backward"], "m": m, "k": k,
                         "n": n, "projections": layer["projections"],
                         "quantized_us": sum(layer["quantized_us"].values()),
                         "nn_linear_us": sum(layer["nn_linear_us"].values()), "ratio": layer["ratio"],
                         "quantized_passes_us": layer["quantized_us"], "nn_linear_passes_us": layer["nn_linear_us"]})
        rows.append({"scope": "block", "bits": block["bits"], "backward": block["backward"], "m": block["tokens"],
                     "projections": [name for layer in block["layers"] for name in layer["projections"]],
                     "quantized_us": block["quantized_us"], "nn_linear_us": block["nn_linear_us"],
                     "ratio": block["ratio"]})
    return rows


def estimate_table(rows: list[dict[str, Any]]) -> str:
    """The estimate as a Markdown table: per (bits, backward) a line per projection shape (µs per projection) and
    one for the whole 800M block (µs summed over its projections)."""
    lines = ["| layer M x K x N | bits | backward | projections | quantized µs (estimate) | "
             "nn.Linear bf16 µs (estimate) | ratio |",
             "|---|---:|---|---|---:|---:|---:|"]
    for row in rows:
        if row["scope"] == "block":
            what, names = "800M block", f"all {len(row['projections'])}, summed"
        else:
            what, names = f"{row['m']}x{row['k']}x{row['n']}", ", ".join(row["projections"])
        lines.append(f"| {what} | {row['bits']} | {row['backward']} | {names} | {row['quantized_us']:.0f} | "
                     f"{row['nn_linear_us']:.0f} | {row['ratio']:.2f}x |")
    return "\n".join(lines)


def assumption_lines(notes: dict[str, Any]) -> str:
    return "\n".join(f"- {text}" for text in notes["assumptions"].values())


# ---- records ----

def _compiled_on(targets: list[str]) -> str:
    # Nothing runs on a GPU, even where one is present: the record names the CPU that compiled.
    return f"{platform.machine()} CPU, compiled for {', '.join(targets)}; no GPU ran"


def profile_record(rows: list[dict[str, Any]], targets: list[str], argv: list[str] | None) -> BenchmarkRecord:
    gpu = Gpu()
    return BenchmarkRecord(
        benchmark="profile", title="Fused Triton kernels: static GPU profile", kind="compiled", module=MODULE,
        command=command_line(COMMAND, argv), rows=rows, device=_compiled_on(targets),
        notes={"targets": targets, "issue_per_byte_of_bandwidth": gpu.sms * 4 * 32 * gpu.clock / gpu.bytes_per_s})


def estimate_record(rows: list[dict[str, Any]], targets: list[str], argv: list[str] | None) -> BenchmarkRecord:
    gpu = Gpu()
    return BenchmarkRecord(
        benchmark="estimate-800m", title="Quantized linear vs nn.Linear, 800M layers and block: estimate",
        kind="estimated", module=MODULE, command=command_line(COMMAND, argv), rows=rows, device=_compiled_on(targets),
        notes={"assumptions": assumptions(gpu), "gpu": asdict(gpu), "settings": [list(s) for s in SETTINGS],
               "block": [list(p) for p in BLOCK_PROJECTIONS], "model": "docs/kernels.md §3"})


def render(record: BenchmarkRecord) -> str:
    """The Markdown body of a ``profile`` or ``estimate-800m`` record's section of BENCHMARKS.md."""
    if record.benchmark == "profile":
        configurations = {(row["kernel"], row["label"], row["target"]) for row in record.rows}
        failed = {(row["kernel"], row["label"], row["target"]) for row in record.rows if row["error"]}
        spilling = {(row["kernel"], row["label"], row["target"]) for row in record.rows
                    if not row["error"] and (row["stack"] or row["local_memory"])}
        return (f"Every launchable configuration, compiled on the CPU for {', '.join(record.notes['targets'])}: "
                f"{len(configurations)} configurations, {len(failed)} failed to compile, {len(spilling)} spill. "
                "Columns as in "
                "docs/kernels.md §2: `issue/tensor` ≤ 1 means the tensor cores, not instruction issue, bound the "
                "loop; `instr/B`: thread-instructions per byte read / per byte read or written (the estimate's H100 "
                f"issues {record.notes['issue_per_byte_of_bandwidth']:.1f} per byte of HBM bandwidth).\n\n"
                f"{markdown_table(record.rows)}\n")
    if record.benchmark == "estimate-800m":
        return ("Forward + backward of each projection shape of the 800M block (µs per projection) and of the whole "
                "block (µs summed over its seven projections; ratio of the sums), quantized vs `nn.Linear` under "
                "bf16 autocast. A model evaluated on compiled code (docs/kernels.md §3), not a measurement.\n\n"
                f"{estimate_table(record.rows)}\n\nAssumptions:\n\n{assumption_lines(record.notes)}\n")
    raise ValueError(f"{MODULE}.render: benchmark {record.benchmark!r} is not allowed; allowed: profile, "
                     "estimate-800m")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {COMMAND}", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    if nvidia_tools() is None:
        print(f"{COMMAND}: the installed triton has no NVIDIA backend with ptxas/cuobjdump/nvdisasm; nothing to "
              "profile", file=sys.stderr)
        return 2
    import triton

    profiles = run_profile(args.targets, args.jobs)
    blocks = [block_estimate(profiles, bits, backward) for bits, backward in SETTINGS]
    rows, estimates = profile_rows(profiles), estimate_rows(blocks)
    records = [profile_record(rows, args.targets, argv), estimate_record(estimates, args.targets, argv)]
    print(f"triton {triton.__version__}; compiled for {', '.join(args.targets)} on this CPU (no GPU)")
    print(markdown_table(rows))
    print()
    print("Forward + backward of the 800M block's projections and of the whole block, estimated from the profile "
          "(docs/kernels.md §3):")
    print(estimate_table(estimates))
    print()
    print("Assumptions:")
    print(assumption_lines(records[1].notes))
    if args.json:
        args.json.write_text(json.dumps({
            "triton": triton.__version__, "profiles": [asdict(p) for p in profiles],
            "estimates": [layer for block in blocks for layer in block["layers"]],
            "blocks": [{key: value for key, value in block.items() if key != "layers"} for block in blocks]},
            indent=1))
    for record in records:
        path = write_record(record, record_directory(args))
        if path is not None:
            print(f"record: {path}")
    failed = [p for p in profiles if p.error]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
