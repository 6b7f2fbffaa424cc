"""The static GPU profile (``python -m bitlaw.benchmarks.profile``): every configuration the code can launch compiles
for sm_90a and sm_80 on this CPU, spill-free, with tensor-core instructions in every dot loop and asynchronous copies
in every GEMM K-loop; and the static targets of docs/kernels.md hold. The estimate covers the 800M block's
projections and the whole block, and the command writes its two records. Skipped only where the installed triton
has no NVIDIA backend."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from bitlaw.benchmarks.profile.estimate import BLOCK_PROJECTIONS, SETTINGS, Gpu
from bitlaw.benchmarks.profile.sass import nvidia_tools
from bitlaw.benchmarks.profile.variants import TARGETS, variants
from bitlaw.benchmarks.record import read_records

pytestmark = pytest.mark.skipif(nvidia_tools() is None, reason="the installed triton has no NVIDIA backend "
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


def test_every_launchable_configuration_compiles_for_both_targets(profile):
    for target, capability in TARGETS.items():
        compiled = _profiles(profile, target=target)
        assert [(p["kernel"], p["label"]) for p in compiled] == [(v.kernel, v.label) for v in variants(capability)]
        assert not [p for p in compiled if p["error"]], [p["error"] for p in compiled if p["error"]]
    assert len(_profiles(profile, kernel="gemm", target="sm_90a")) == 5  # the Hopper autotuning list


def test_no_configuration_spills(profile):
    spilling = [(p["kernel"], p["label"], p["target"], p["stack"]) for p in profile["profiles"]
                if p["stack"] or any(loop["local_memory"] for loop in p["loops"])]
    assert not spilling


def test_every_dot_loop_runs_on_tensor_cores_and_every_gemm_loop_copies_asynchronously(profile):
    for p in profile["profiles"]:
        wgmma = p["target"] == "sm_90a"
        has_dot = p["kernel"] in ("gemm", "grad_gemm", "quantize", "masked_rotate") or "rotated back" in p["label"]
        if not has_dot:
            assert not any(loop["mma"] for loop in p["loops"]), p["label"]
            continue
        dot_loops = [loop for loop in p["loops"] if loop["mma"]]
        assert dot_loops, (p["kernel"], p["label"], p["target"])
        for loop in dot_loops:
            # The GEMMs' K-loops multiply int8 (the backward's too: its int8 gradient against the codes).
            integer = p["kernel"] in ("gemm", "grad_gemm")
            prefix = ("IGMMA" if wgmma else "IMMA") if integer else ("HGMMA" if wgmma else "HMMA")
            assert all(op.startswith(prefix) for op in loop["mma"]), (p["label"], loop["mma"])
        if p["kernel"] == "gemm":
            (k_loop,) = p["loops"]
            assert k_loop["async_copies"] > 0 and k_loop["scalar_loads"] == 0, (p["label"], p["target"])
        if p["kernel"] == "grad_gemm":  # its per-row block scales are the only scalar loads
            (k_loop,) = p["loops"]
            assert k_loop["async_copies"] > 0, (p["label"], p["target"])


def test_static_targets_hold(profile):
    # docs/kernels.md §2-3: the forward GEMM issues at most 1.5 cycles of instructions per cycle of tensor-core work,
    for p in _profiles(profile, kernel="gemm"):
        (loop,) = p["loops"]
        assert loop["issue_cycles"] <= 1.5 * loop["tensor_cycles"], (p["label"], p["target"])
    # the W4A4 quantizer (its rounding pass, or its one pass) and the gradient quantizer (both GEMMs' operands from
    # one read of g_y) are memory-bound on Hopper: at most as many thread-instructions per byte they move as the
    # estimate's GPU issues per byte of HBM bandwidth (about 10.3); the other bit widths within 5% of it (W1A1's one
    # pass writes the fewest bytes: 1% over),
    gpu = Gpu()
    per_byte_of_bandwidth = gpu.sms * 4 * 32 * gpu.clock / gpu.bytes_per_s
    for kernel in ("quantize", "quantize_grad"):
        for p in _profiles(profile, kernel=kernel, target="sm_90a"):
            main = [loop for loop in p["loops"] if loop["instructions_per_byte_moved"] is not None]
            limit = per_byte_of_bandwidth * (1.0 if kernel == "quantize_grad" or "w4a4" in p["label"] else 1.05)
            assert main and all(loop["instructions_per_byte_moved"] <= limit for loop in main), (p["label"], main)
    # the backward's block-scaled GEMM is tensor-bound on Hopper,
    for p in _profiles(profile, kernel="grad_gemm", target="sm_90a"):
        (loop,) = p["loops"]
        assert loop["issue_cycles"] <= loop["tensor_cycles"], (p["label"], loop)
    # and the estimated W4A4 layer forward + backward is no slower than nn.Linear in bf16 at the 800M MLP shape; with
    # both backward GEMMs in int8 (quest_w4a4_g8g8) at most 0.65x of it.
    estimates = {e["backward"]: e for e in profile["estimates"] if e["shape"] == [16384, 2048, 5632] and e["bits"] == 4}
    assert estimates["bf16"]["ratio"] <= 1.0, estimates["bf16"]
    assert estimates["g8g8"]["ratio"] < estimates["g8"]["ratio"] < estimates["bf16"]["ratio"]
    assert estimates["g8g8"]["ratio"] <= 0.65, estimates["g8g8"]
    for backward in ("bf16", "g8g8"):
        assert f"| 16384x2048x5632 | 4 | {backward} |" in profile["stdout"]


def test_the_estimate_covers_the_800m_block_and_sums_its_seven_projections(profile):
    shapes = {(2048, 2048): 4, (2048, 5632): 2, (5632, 2048): 1}  # (K, N) → projections of that shape in the block
    assert sorted((k, n) for _, k, n in BLOCK_PROJECTIONS) == sorted(shape for shape, count in shapes.items()
                                                                     for _ in range(count))
    assert len(profile["blocks"]) == len(SETTINGS)
    for block in profile["blocks"]:
        layers = [e for e in profile["estimates"] if (e["bits"], e["backward"]) == (block["bits"], block["backward"])]
        assert sorted(tuple(e["shape"]) for e in layers) == sorted((16384, k, n) for k, n in shapes)
        quantized = sum(shapes[tuple(e["shape"][1:])] * sum(e["quantized_us"].values()) for e in layers)
        plain = sum(shapes[tuple(e["shape"][1:])] * sum(e["nn_linear_us"].values()) for e in layers)
        assert math.isclose(block["quantized_us"], quantized) and math.isclose(block["nn_linear_us"], plain)
        assert math.isclose(block["ratio"], quantized / plain)
        assert f"| 800M block | {block['bits']} | {block['backward']} | all 7, summed | {quantized:.0f} | " \
               f"{plain:.0f} | {quantized / plain:.2f}x |" in profile["stdout"]
    assert "6144" not in profile["stdout"].split("estimated from the profile")[1]  # no shape outside the model


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
    configurations = len({(r["kernel"], r["label"], r["target"]) for r in compiled.rows})
    assert f"{configurations} configurations, 0 failed to compile, 0 spill" in text
    blocks = [row for row in estimated.rows if row["scope"] == "block"]
    assert [(row["bits"], row["backward"]) for row in blocks] == [tuple(s) for s in SETTINGS]
    assert [row["ratio"] for row in blocks] == [block["ratio"] for block in profile["blocks"]]
    text = render(estimated)
    for row in estimated.rows:
        assert f"| {row['quantized_us']:.0f} | {row['nn_linear_us']:.0f} | {row['ratio']:.2f}x |" in text
    gpu = Gpu()
    assert estimated.notes["gpu"]["bytes_per_s"] == gpu.bytes_per_s
    for figure in (f"{gpu.sms} SMs at {gpu.clock / 1e9:.2f} GHz", f"{gpu.matmul_efficiency:.0%}",
                   f"{gpu.bytes_per_s / 1e12:.1f} TB/s"):
        assert figure in text  # the assumptions stand beside the numbers
