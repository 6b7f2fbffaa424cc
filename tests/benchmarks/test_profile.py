"""The static GPU profile (``python -m bitlaw.benchmarks.profile``): every configuration the code launches compiles
for sm_90a and sm_80 on this CPU, spill-free, with tensor-core instructions in every rotation loop, and the memory
passes stay within the issue budget of docs/kernels.md §2; the command writes its two records. The block estimate
(docs/kernels.md §3) has every part of the 800M block, a row per GEMM efficiency and recipe, and ratios that are the
quotient of its sums; these structural checks also run without the profile. The profile's tests are skipped only
where the installed triton has no NVIDIA backend. Nothing here asserts a timing."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from bitlaw.benchmarks.profile import __main__ as profile_command
from bitlaw.benchmarks.profile.estimate import (
    D_MODEL,
    EFFICIENCIES,
    GROUPS,
    HIDDEN,
    RATIO_TARGETS,
    RECIPES,
    TOKENS,
    Gpu,
    block_estimate,
    estimates,
)
from bitlaw.benchmarks.profile.sass import nvidia_tools
from bitlaw.benchmarks.profile.variants import TARGETS, variants
from bitlaw.benchmarks.record import BenchmarkRecord, read_records

needs_ptxas = pytest.mark.skipif(nvidia_tools() is None, reason="the installed triton has no NVIDIA backend "
                                                                "(ptxas, cuobjdump, nvdisasm) to compile with")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("profile")
    out, records = folder / "profile.json", folder / "records"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # compile, not interpret
    done = subprocess.run([sys.executable, "-m", "bitlaw.benchmarks.profile", "--json", str(out), "--jobs", "2",
                           "--record-dir", str(records)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    data["stdout"] = done.stdout
    data["records"] = {record.benchmark: record for record in read_records(records)}
    return data


def _profiles(profile: dict, **where) -> list[dict]:
    return [p for p in profile["profiles"] if all(p[key] == value for key, value in where.items())]


@needs_ptxas
def test_every_launchable_configuration_compiles_for_both_targets(profile):
    for target, capability in TARGETS.items():
        compiled = _profiles(profile, target=target)
        assert [(p["kernel"], p["label"]) for p in compiled] == [(v.kernel, v.label) for v in variants(capability)]
        assert not [p for p in compiled if p["error"]], [p["error"] for p in compiled if p["error"]]
    # The quantized backward's three passes are profiled; no GEMM is (they are the vendor's).
    assert {p["kernel"] for p in profile["profiles"]} == {"quantize", "dequantize", "masked_rotate", "amax_grad",
                                                          "quantize_grad", "codes_t"}


@needs_ptxas
def test_no_configuration_spills(profile):
    spilling = [(p["kernel"], p["label"], p["target"], p["stack"]) for p in profile["profiles"]
                if p["stack"] or any(loop["local_memory"] for loop in p["loops"])]
    assert not spilling


@needs_ptxas
def test_every_rotation_runs_on_tensor_cores(profile):
    for p in profile["profiles"]:
        rotates = p["kernel"] in ("quantize", "masked_rotate") or "rotated back" in p["label"]
        if not rotates:
            assert not any(loop["mma"] for loop in p["loops"]), p["label"]
            continue
        dot_loops = [loop for loop in p["loops"] if loop["mma"]]
        assert dot_loops, (p["kernel"], p["label"], p["target"])
        prefix = "HGMMA" if p["target"] == "sm_90a" else "HMMA"  # bf16 dots against the ±1 matrix
        for loop in dot_loops:
            assert all(op.startswith(prefix) for op in loop["mma"]), (p["label"], loop["mma"])


@needs_ptxas
def test_the_memory_passes_stay_within_the_issue_budget_on_hopper(profile):
    # docs/kernels.md §2: the W4A4 quantizer (its rounding pass, or its one pass) and the gradient passes issue at
    # most as many thread-instructions per byte they move as the estimate's GPU issues per byte of bandwidth; the
    # other bit widths within 5 % of it.
    # The fp8 gradient quantizer (a hash, two stochastic fp8 roundings and a transposed store per entry of g_y, about
    # 70 instructions) is issue-bound at about 1.75x that budget: the estimate charges it at the issue rate, and this
    # holds it below twice the budget so that it cannot drift further unnoticed.
    gpu = Gpu()
    per_byte_of_bandwidth = gpu.sms * 4 * 32 * gpu.clock / gpu.bytes_per_s
    for kernel in ("quantize", "amax_grad", "quantize_grad"):
        for p in _profiles(profile, kernel=kernel, target="sm_90a"):
            main = [loop for loop in p["loops"] if loop["instructions_per_byte_moved"] is not None]
            limit = per_byte_of_bandwidth * {"quantize": 1.05 if "w4a4" not in p["label"] else 1.0,
                                             "amax_grad": 1.0, "quantize_grad": 2.0}[kernel]
            assert main and all(loop["instructions_per_byte_moved"] <= limit for loop in main), (p["label"], main)


@needs_ptxas
def test_the_records_hold_the_figures_and_render_them(profile):
    records = profile["records"]
    assert set(records) == {"profile", "estimate-800m"}
    compiled, estimated = records["profile"], records["estimate-800m"]
    assert (compiled.kind, estimated.kind) == ("compiled", "estimated")
    assert compiled.command.startswith("python -m bitlaw.benchmarks.profile --json")
    assert compiled.commit and compiled.date and "triton" in compiled.versions
    assert compiled.device == estimated.device and compiled.device.endswith("compiled for sm_90a, sm_80; no GPU ran")
    # One row per loop of every compiled configuration, the same figures as the JSON.
    loops = [(p["kernel"], p["label"], p["target"], loop["name"], loop["instructions"], p["registers"])
             for p in profile["profiles"] for loop in p["loops"]]
    assert [(r["kernel"], r["label"], r["target"], r["loop"], r["instructions"], r["registers"])
            for r in compiled.rows] == loops
    render = importlib.import_module(compiled.module).render
    assert importlib.import_module(estimated.module).render is render
    text = render(compiled)
    assert not text.startswith("#")
    for row in compiled.rows:
        assert f"| {row['target']} | {row['num_warps']}/{row['num_stages']} | {row['registers']} | {row['stack']} | " \
               f"{row['shared'] / 1024:.0f} | {row['loop']}: {row['instructions']} |" in text
    # The counts of the summary line (whether anything spills is test_no_configuration_spills's question).
    configurations = len({(r["kernel"], r["label"], r["target"]) for r in compiled.rows})
    spilling = len({(r["kernel"], r["label"], r["target"]) for r in compiled.rows if r["stack"] or r["local_memory"]})
    assert f"{configurations} configurations, 0 failed to compile, {spilling} spill" in text
    # The estimate's rows are the JSON's blocks, printed by the command and rendered with its assumptions.
    blocks = [row for row in estimated.rows if row["scope"] == "block"]
    assert [(row["efficiency"], row["recipe"], row["ratio"]) for row in blocks] == \
        [(b["efficiency"], b["recipe"], b["ratio"]) for b in profile["blocks"]]
    text = render(estimated)
    for row in blocks:
        line = f"| {row['efficiency']:.1f} | {row['recipe']} |"
        assert line in text and line in profile["stdout"]
        assert f"| {row['block_us']:.0f} | {row['ratio']:.2f}x |" in text
    _assert_assumptions_beside(text)


def _assert_assumptions_beside(text: str) -> None:
    gpu = Gpu()
    for figure in (f"{gpu.sms} SMs at {gpu.clock / 1e9:.2f} GHz", "60%, 70%, 80%", f"{gpu.bytes_per_s / 1e12:.2f} TB/s",
                   f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s", "arXiv:2407.08608", "estimate"):
        assert figure in text, figure


# ---- the block estimate's structure (no compiler needed: the passes then run at the bandwidth) ----

PROJECTION_PARTS = [name for name, _, _ in GROUPS]


def test_the_groups_are_the_800m_blocks_projections():
    # q, k, v share one input (one GEMM against 6144 rows), gate and up another (11264 rows); o and down alone.
    assert [(name, k, sum(outs)) for name, k, outs in GROUPS] == [
        ("qkv", 2048, 6144), ("o", 2048, 2048), ("gate/up", 2048, 11264), ("down", 5632, 2048)]
    weights = sum(k * sum(outs) for _, k, outs in GROUPS)
    assert weights == 4 * D_MODEL**2 + 3 * D_MODEL * HIDDEN  # every projection weight of the block, once


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_block_has_every_part_and_sums_its_passes(recipe):
    block = block_estimate([], recipe)
    assert list(block["parts"]) == [*PROJECTION_PARTS, "attention", "elementwise"]
    assert set(block["parts"]["attention"]) == {"attention forward", "attention backward"}
    assert {"RMSNorms + casts to bf16 (2)", "RoPE on q, k", "SiLU·mul", "residual adds (2)"} <= \
        set(block["parts"]["elementwise"])
    for part, passes in block["parts"].items():
        assert passes and all(us > 0 for us in passes.values()), part
        assert math.isclose(block["part_us"][part], sum(passes.values()))
    assert math.isclose(block["block_us"], sum(block["part_us"].values()))
    assert block["tokens"] == TOKENS == 16_384


def test_each_recipe_has_its_gemms_and_passes():
    gemms = {recipe: [name for name in block_estimate([], recipe)["parts"]["qkv"] if "·" in name]
             for recipe in RECIPES}
    assert gemms == {"bf16": ["x·wᵀ (bf16)", "g_y·w (bf16)", "g_yᵀ·x (bf16)"],
                     "quest_w4a4": ["x̂·ŵᵀ (fp8)", "g_y·ŵ (bf16)", "g_yᵀ·x̂ (bf16)"],
                     "quest_w4a4_g8g8": ["x̂·ŵᵀ (fp8)", "g_y·ŵ (fp8)", "g_yᵀ·x̂ (fp8)"]}
    g8g8 = block_estimate([], "quest_w4a4_g8g8")["parts"]
    for part in PROJECTION_PARTS:
        assert {"quantize x", "quantize w", "amax of g_y", "quantize g_y (fp8, both operands)", "ŵ codes, transposed",
                "x̂ codes, transposed", "mask + IHT g_x", "mask + IHT g_w"} <= set(g8g8[part])
    # Only the shared inputs sum (bf16) or join (quantized) the gradients of several projections.
    for recipe, name in (("bf16", "sum of the input's gradients"), ("quest_w4a4", "join the output gradients")):
        parts = block_estimate([], recipe)["parts"]
        assert [part for part in PROJECTION_PARTS if name in parts[part]] == ["qkv", "gate/up"]


def test_a_gemm_takes_its_flops_at_the_efficiency_of_its_peak():
    gpu = Gpu(matmul_efficiency=0.7)
    qkv = block_estimate([], "quest_w4a4_g8g8", gpu)["parts"]["qkv"]
    flops = 2.0 * TOKENS * 2048 * 6144
    assert math.isclose(qkv["x̂·ŵᵀ (fp8)"], flops / (0.7 * gpu.peak("fp8")) * 1e6)
    bf16 = block_estimate([], "bf16", gpu)["parts"]["qkv"]
    assert math.isclose(bf16["x·wᵀ (bf16)"], 2 * qkv["x̂·ŵᵀ (fp8)"])  # fp8's dense peak is twice bf16's


def test_there_is_a_row_per_efficiency_and_recipe_and_the_ratio_is_the_quotient():
    blocks = estimates([])
    assert [(b["efficiency"], b["recipe"]) for b in blocks] == [(e, r) for e in EFFICIENCIES for r in RECIPES]
    assert EFFICIENCIES == (0.6, 0.7, 0.8)
    by = {(b["efficiency"], b["recipe"]): b for b in blocks}
    for efficiency in EFFICIENCIES:
        base = by[efficiency, "bf16"]["block_us"]
        assert by[efficiency, "bf16"]["ratio"] == 1.0
        for recipe in RECIPES:
            assert math.isclose(by[efficiency, recipe]["ratio"], by[efficiency, recipe]["block_us"] / base)
        # Attention and the elementwise passes do not depend on the recipe or on the GEMMs' efficiency.
        for part in ("attention", "elementwise"):
            assert len({round(by[efficiency, r]["part_us"][part], 9) for r in RECIPES}) == 1
    assert by[0.6, "bf16"]["part_us"]["attention"] == by[0.8, "bf16"]["part_us"]["attention"]


def test_the_estimate_tables_show_every_row_the_targets_and_the_assumptions():
    rows = profile_command.estimate_rows(estimates([]))
    record = BenchmarkRecord(benchmark="estimate-800m", title="t", kind="estimated", module=profile_command.MODULE,
                             command="c", rows=rows, notes=profile_command.estimate_record(rows, ["sm_90a"], []).notes)
    text = profile_command.render(record)
    blocks = [row for row in rows if row["scope"] == "block"]
    for row in blocks:
        parts = " | ".join(f"{row['part_us'][part]:.0f}" for part in profile_command.PARTS)
        assert f"| {row['efficiency']:.1f} | {row['recipe']} | {parts} | {row['block_us']:.0f} | " \
               f"{row['ratio']:.2f}x |" in text
    for recipe, limit in RATIO_TARGETS.items():
        (row,) = [r for r in blocks if (r["efficiency"], r["recipe"]) == (0.6, recipe)]
        verdict = "met" if row["ratio"] <= limit else f"missed by {row['ratio'] - limit:.2f}"
        assert f"| ≤ {limit:.2f}x: {verdict} |" in text
    passes = [row for row in rows if row["scope"] == "pass" and row["efficiency"] == 0.6]
    assert "| qkv | quantize x | — |" in text  # bf16 quantizes nothing
    for row in passes:
        assert f"| {row['part']} | {row['name']} |" in text
    _assert_assumptions_beside(text)


@needs_ptxas
def test_every_dot_loop_reports_its_wgmma_wait_and_every_kernel_its_occupancy(profile):
    """The Triton loops that remain are memory-bound passes whose dot (the ±1 Hadamard matrix) feeds the rounding
    right after it, so each waits for its wgmma group (0 in flight): what keeps the tensor cores and memory busy
    there is occupancy — at least two CTAs per multiprocessor, so one CTA's wait overlaps another's loads — and
    the quantizer's loads issued stages ahead. No K-loop GEMM is left in Triton (the vendor's GEMMs replaced them)."""
    hopper = _profiles(profile, target="sm_90a")
    assert hopper and not any(p["kernel"] in ("gemm", "grad_gemm") for p in hopper)
    dot_loops = [(p, loop) for p in hopper for loop in p["loops"] if any(op.startswith("HGMMA") for op in loop["mma"])]
    assert dot_loops and all(loop["wgmma_in_flight"] is not None for _, loop in dot_loops)
    assert all(p["ctas_per_sm"] >= 2 for p in hopper), [(p["kernel"], p["label"], p["ctas_per_sm"]) for p in hopper]
    for p in _profiles(profile, kernel="quantize", target="sm_90a"):
        if p["num_stages"] > 1:  # the two-pass loop: its loads run stages ahead of the dot that waits
            assert any(loop["async_copies"] for loop in p["loops"]), p["label"]


def test_occupancy_follows_the_cuda_rules():
    from bitlaw.benchmarks.profile.sass import ctas_per_sm

    assert ctas_per_sm(167, 4, 90112, 90) == 2  # the two-pass quantizer: shared memory bounds it
    assert ctas_per_sm(255, 4, 0, 90) == 2  # 256 registers × 128 threads = half the register file
    assert ctas_per_sm(32, 4, 0, 90) == 16  # warps bound it: 64 / 4
    assert ctas_per_sm(64, 8, 0, 80) == 4
