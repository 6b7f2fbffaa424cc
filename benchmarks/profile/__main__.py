"""Static GPU profile of the Triton kernels: compiled ahead of time for Hopper (sm_90a) and Ampere (sm_80) on the CPU.

    python -m bitlaw.benchmarks.profile                  # the tables, both targets, and the two records
    python -m bitlaw.benchmarks.profile --json out.json  # also every figure as JSON

No GPU is needed (``sass``). For every configuration the code launches for the presets (``variants``: the fused
quantizer, the backward's dequantize and mask + inverse-Hadamard passes, the quantized backward's gradient passes;
the GEMMs are the vendor's and are not profiled) the table reports, per loop of the kernel (or its whole body when
it has none):

- ``regs``, ``stack`` (bytes of local memory per thread: spills), ``smem`` (KiB, static + dynamic);
- ``instr``: SASS instructions per iteration, ``mma``: the tensor-core instructions among them (wgmma ``HGMMA`` on
  sm_90a, ``HMMA`` on sm_80: the Hadamard rotations), ``async``: asynchronous copies into shared memory
  (``LDGSTS`` = cp.async, ``UTMALDG`` = TMA), ``ldg vec/scalar``: global loads of 64/128 bits vs narrower ones;
- the issue-slot model of docs/kernels.md §2: ``issue`` = instructions × warps / 4 cycles per iteration (four
  schedulers per SM, one warp-instruction each per cycle), ``tensor`` = the iteration's MMA operations / the SM's
  dense tensor-core rate; ``instr/B``: thread-instructions per input byte and per byte moved (read or written);
  the estimate's H100 issues about 10 per byte of HBM traffic at its bandwidth, so a pass whose instructions per
  byte moved stay below that is memory-bound.

An integer argument equal to 1 is compiled as the constant 1, as Triton specializes it at every launch: the unit
column strides of the contiguous gradients the backward kernels read (so their loads vectorize as they will).

Then the estimate (``estimate``) models the forward + backward of one whole 800M block for bf16, quest_w4a4 and the
quantized backward, at GEMM efficiencies of 0.6, 0.7 and 0.8 (docs/kernels.md §3). It is an estimate from compiled
code and published rates, not a measurement. Records (``benchmarks.record``): ``profile`` (kind ``compiled``: one
row per loop of each compiled configuration) and ``estimate-800m`` (kind ``estimated``: per efficiency and recipe
the block, its parts and passes, with the assumptions in its notes).
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
from .estimate import EFFICIENCIES, GROUPS, RATIO_TARGETS, RECIPES, TARGET_EFFICIENCY, Gpu, assumptions, estimates
from .sass import Profile, nvidia_tools, run_profile
from .variants import TARGETS

COMMAND = "bitlaw.benchmarks.profile"
MODULE = "bitlaw.benchmarks.profile.__main__"  # where render() lives: the generator of BENCHMARKS.md imports it


# ---- the compiled profile: one row per loop ----

def profile_rows(profiles: list[Profile]) -> list[dict[str, Any]]:
    """One flat row per loop of each compiled variant (one row, ``loop`` None, for a variant that did not compile):
    the variant's ``kernel, label, target, num_warps, num_stages, error``, its ``registers``, ``stack`` and
    ``shared`` (bytes), ``total_instructions_per_input_byte`` (all loops, memory-bound kernels), and the loop's
    fields (``loop``: its name; ``instructions``, ``mma`` …, see ``sass.Loop``)."""
    rows = []
    for item in profiles:
        base = {"kernel": item.kernel, "label": item.label, "target": item.target, "num_warps": item.num_warps,
                "num_stages": item.num_stages, "error": item.error, "registers": item.registers,
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
    if row["instructions_per_input_byte"] is not None:
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


# ---- the estimate: per efficiency and recipe, the block and its passes ----

def estimate_rows(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per :func:`~.estimate.estimates` entry a ``block`` row (``efficiency, recipe, block_us, ratio`` to bf16 at
    that efficiency, ``part_us``: µs per part) followed by a ``pass`` row per pass (``efficiency, recipe, part,
    name, us``). Times in µs per step of one block."""
    rows = []
    for block in blocks:
        rows.append({"scope": "block", "efficiency": block["efficiency"], "recipe": block["recipe"],
                     "block_us": block["block_us"], "ratio": block["ratio"], "part_us": block["part_us"]})
        rows += [{"scope": "pass", "efficiency": block["efficiency"], "recipe": block["recipe"], "part": part,
                  "name": name, "us": us}
                 for part, passes in block["parts"].items() for name, us in passes.items()]
    return rows


PARTS = [name for name, _, _ in GROUPS] + ["attention", "elementwise"]


def _target(row: dict[str, Any]) -> str:
    limit = RATIO_TARGETS.get(row["recipe"])
    if limit is None or row["efficiency"] != TARGET_EFFICIENCY:
        return ""
    verdict = "met" if row["ratio"] <= limit else f"missed by {row['ratio'] - limit:.2f}"
    return f"≤ {limit:.2f}x: {verdict}"


def estimate_table(rows: list[dict[str, Any]]) -> str:
    """The block estimate as a Markdown table: per GEMM efficiency and recipe, µs per part, the block and its
    ratio to bf16 (with the issue's target at 0.6)."""
    lines = ["| GEMM efficiency | recipe | " + " | ".join(f"{part} µs" for part in PARTS) +
             " | block µs (estimate) | vs bf16 | target |",
             "|---:|---|" + "---:|" * len(PARTS) + "---:|---:|---|"]
    for row in rows:
        if row["scope"] == "block":
            parts = " | ".join(f"{row['part_us'][part]:.0f}" for part in PARTS)
            lines.append(f"| {row['efficiency']:.1f} | {row['recipe']} | {parts} | {row['block_us']:.0f} | "
                         f"{row['ratio']:.2f}x | {_target(row)} |")
    return "\n".join(lines)


def pass_table(rows: list[dict[str, Any]], efficiency: float = TARGET_EFFICIENCY) -> str:
    """Every pass of the block at ``efficiency`` as a Markdown table: µs per recipe (— where a recipe has no such
    pass)."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if row["scope"] == "pass" and row["efficiency"] == efficiency:
            cells.setdefault((row["part"], row["name"]), {})[row["recipe"]] = row["us"]
    lines = ["| part | pass | " + " | ".join(f"{recipe} µs" for recipe in RECIPES) + " |",
             "|---|---|" + "---:|" * len(RECIPES)]
    for (part, name), times in cells.items():
        figures = " | ".join(f"{times[recipe]:.1f}" if recipe in times else "—" for recipe in RECIPES)
        lines.append(f"| {part} | {name} | {figures} |")
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
        benchmark="estimate-800m", title="One 800M block, forward + backward, bf16 vs quantized: estimate",
        kind="estimated", module=MODULE, command=command_line(COMMAND, argv), rows=rows, device=_compiled_on(targets),
        notes={"assumptions": assumptions(gpu), "gpu": asdict(gpu), "recipes": list(RECIPES),
               "efficiencies": list(EFFICIENCIES), "targets": RATIO_TARGETS, "target_efficiency": TARGET_EFFICIENCY,
               "groups": [[name, k, list(outs)] for name, k, outs in GROUPS], "model": "docs/kernels.md §3"})


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
        efficiency = record.notes["target_efficiency"]
        return ("Forward + backward of one whole 800M block at 16,384 tokens (its projection groups, attention and "
                "the memory passes around them), µs per step, for bf16 (`nn.Linear` under autocast), `quest_w4a4` "
                "and the quantized backward (`quest_w4a4_g8g8`: fp8 e4m3 gradients, row-wise scales), at "
                "three GEMM efficiencies; the ratio is the block's time over bf16's at the same efficiency. An "
                "estimate: a model evaluated on compiled code and published rates (docs/kernels.md §3), not a "
                f"measurement, with these assumptions:\n\n{assumption_lines(record.notes)}\n\n"
                f"{estimate_table(record.rows)}\n\nEvery pass at GEMM efficiency {efficiency} (µs, estimate):\n\n"
                f"{pass_table(record.rows, efficiency)}\n")
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
    blocks = estimates(profiles)
    rows, estimated = profile_rows(profiles), estimate_rows(blocks)
    records = [profile_record(rows, args.targets, argv), estimate_record(estimated, args.targets, argv)]
    print(f"triton {triton.__version__}; compiled for {', '.join(args.targets)} on this CPU (no GPU)")
    print(markdown_table(rows))
    print()
    print("Forward + backward of one 800M block, estimated (docs/kernels.md §3):")
    print(estimate_table(estimated))
    print()
    print(pass_table(estimated))
    print()
    print("Assumptions:")
    print(assumption_lines(records[1].notes))
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "profiles": [asdict(p) for p in profiles],
                                         "blocks": blocks}, indent=1))
    for record in records:
        path = write_record(record, record_directory(args))
        if path is not None:
            print(f"record: {path}")
    failed = [p for p in profiles if p.error]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
