"""Benchmarks of the quantized linear, every figure measured side by side in one run and printed as one table.

    python -m bitlaw.benchmarks.kernels          # on CUDA: the fast path at the 800M block's GEMM shapes
    python -m bitlaw.benchmarks.kernels --cpu    # the reference PyTorch path vs nn.Linear on the CPU
    TRITON_INTERPRET=1 python -m bitlaw.benchmarks.kernels --triton --shapes 64x256x128  # the kernel table, interpreted

The kernel table (CUDA medians of ``triton.testing.do_bench``) has, per GEMM shape ``M x K x N`` (tokens, in, out:
the 800M block's groups, q/k/v as one GEMM of 6144 outputs, o, gate/up as one of 11264, down), with the operands
training feeds (bf16 activations, the fp32 master weight, bf16 autocast):

- ``gemm``: ``torch._scaled_mm`` on the e4m3 codes the quantizer writes, with row-wise scales ``[M, 1]`` and
  ``[1, N]`` and bf16 output (the forward GEMM of the fast path), vs ``torch.mm`` in bf16 on the same shape, as
  time, TFLOP/s and the ratio of the two;
- ``quantize``: the fused quantizer on the bf16 input ``[M, K]`` with the ``quest_w4a4`` input spec (e4m3 codes for
  the GEMM, packed codes and bit mask for backward, steps); GB/s counts the bytes it reads plus the bytes it writes,
  next to a device-to-device copy of the input (read + write), and the ratio of the two;
- per recipe, ``check``: the Triton layer's output and gradients against the reference path at this shape
  (relative error of the norm; bf16 rounding makes it ~1e-3, a wrong kernel makes it ~1); ``linear``: forward +
  backward of the whole quantized linear (Triton path) vs ``nn.Linear`` under the same bf16 autocast and vs the
  reference PyTorch path (``kernels.quantizers``); ``saved``: bytes autograd keeps for backward per linear
  (activations only, measured with saved-tensor hooks) relative to ``nn.Linear``'s.

Records (``benchmarks.record``): the CUDA kernel table as ``kernels-gpu``, the CPU reference table as
``kernels-reference-cpu``, raw milliseconds, bytes and GB/s per row. Under the interpreter the timings measure
numpy, not kernels: that mode only proves the benchmark runs, and writes no record. Timings are never asserted
anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import benchmark

from ..kernels.recipe import load_recipe
from . import markdown
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.kernels"
# (tokens M, in_features K, out_features N): the tiny model's projections and the 30M/100M ones.
CPU_SHAPES = [(1024, 256, 768), (2048, 640, 1792), (2048, 1024, 2816)]
# The GEMMs of an 800M block (d_model 2048, MLP 5632) at 16,384 tokens: q/k/v (one GEMM against the three
# weights), o, gate/up (one GEMM against both), down.
GPU_SHAPES = [(16384, 2048, 6144), (16384, 2048, 2048), (16384, 2048, 11264), (16384, 5632, 2048)]
# Under the interpreter: one small shape with two row tiles and two Hadamard blocks, seconds per measurement.
INTERPRETER_SHAPES = [(96, 256, 128)]
RECIPES = ["quest_w4a4", "quest_w1a1", "quest_w4"]
KERNEL_RECIPES = ["quest_w4a4", "quest_w4a4_g8g8", "quest_w1a1"]
CHECK_TOLERANCE = 2e-2  # relative norm error above which the Triton layer disagrees with the reference


def _fwd_bwd(fn, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        w.grad = None
        fn(x, w).backward(grad)

    return run


def _median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    fn()  # warm-up
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def median_ms(fn: Callable[[], object], device: torch.device, min_run_time: float) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_run_time * 1000)),
                                             return_mode="median"))
    return _median_seconds(fn, min_run_time) * 1e3


def measure(shape: tuple[int, int, int], recipe_names: list[str], device: torch.device, dtype: torch.dtype,
            min_run_time: float) -> tuple[float, dict[str, float]]:
    """Median seconds of forward+backward at ``shape`` on the reference path: ``(nn.Linear, {recipe: seconds})``."""
    from ..kernels.quantizers import reference_linear

    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k**-0.5).requires_grad_(True)
    grad = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
    plain = _median_seconds(_fwd_bwd(torch.nn.functional.linear, x, w, grad), min_run_time)
    quant = {}
    for name in recipe_names:
        recipe = load_recipe(name)
        quant[name] = _median_seconds(_fwd_bwd(lambda a, b, r=recipe: reference_linear(a, b, r), x, w, grad),
                                      min_run_time)
    return plain, quant


REFERENCE_HEADER = ("M x K x N", "recipe", "nn.Linear ms", "quantized ms", "ratio")


def _dims(row: dict[str, Any]) -> str:
    return f"{row['m']}x{row['k']}x{row['n']}"


def reference_cells(row: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """One row of the reference table as text, in the columns of :data:`REFERENCE_HEADER`."""
    return (_dims(row), row["recipe"], f"{row['nn_linear_ms']:.2f}", f"{row['quantized_ms']:.2f}",
            f"{row['quantized_ms'] / row['nn_linear_ms']:.2f}x")


def reference_table(shapes: list[tuple[int, int, int]], recipe_names: list[str], device: torch.device,
                    dtype: torch.dtype, min_run_time: float) -> list[dict[str, Any]]:
    """Print forward+backward of the reference quantized linear vs ``nn.Linear`` at ``shapes``; returns the rows
    ``{m, k, n, recipe, nn_linear_ms, quantized_ms}`` (medians, milliseconds)."""
    print("path: reference PyTorch quantizers (kernels.quantizers), forward + backward of y = Q(x) Q(w)^T")
    header = f"{'M x K x N':>20} {'recipe':>12} {'nn.Linear ms':>13} {'quantized ms':>13} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for m, k, n in shapes:
        base, quant = measure((m, k, n), recipe_names, device, dtype, min_run_time)
        for recipe_name, seconds in quant.items():
            row = {"m": m, "k": k, "n": n, "recipe": recipe_name, "nn_linear_ms": base * 1e3,
                   "quantized_ms": seconds * 1e3}
            rows.append(row)
            dims, recipe, plain, quantized, ratio = reference_cells(row)
            print(f"{dims:>20} {recipe:>12} {plain:>13} {quantized:>13} {ratio:>7}")
    return rows


def _tflops(flops: float, ms: float) -> str:
    return f"{flops / ms / 1e9:.4g} TF/s"


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _layer_measurements(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, recipe_name: str,
                        device: torch.device, min_run_time: float) -> dict[str, Any]:
    """One recipe's layer at the shape of ``x`` ``[M, K]`` and ``w`` ``[N, K]``: ``recipe, check_rel_error`` (the
    largest relative norm error of output, input and weight gradients, Triton path vs reference), forward +
    backward ``linear_ms`` (Triton path), ``nn_linear_ms``, ``reference_ms``, and ``saved_bytes`` /
    ``nn_linear_saved_bytes``: activation bytes autograd keeps for backward."""
    from ..kernels.linear import quantized_linear, saved_tensor_bytes

    recipe = load_recipe(recipe_name)
    row: dict[str, Any] = {"recipe": recipe_name}
    results = {}
    for backend in ("reference", "triton"):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with _autocast(device):
            y = quantized_linear(xg, wg, recipe, backend=backend)
        y.backward(grad)
        results[backend] = (y.detach().float(), xg.grad.float(), wg.grad.float())
    row["check_rel_error"] = max(float((a - b).norm() / b.norm())
                                 for a, b in zip(results["triton"], results["reference"], strict=True))

    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def layer(fn):
        def run() -> None:
            xg.grad = None
            wg.grad = None
            with _autocast(device):
                out = fn(xg, wg)
            out.backward(grad)

        return run

    row["nn_linear_ms"] = median_ms(layer(torch.nn.functional.linear), device, min_run_time)
    row["linear_ms"] = median_ms(layer(lambda a, b: quantized_linear(a, b, recipe, backend="triton")), device,
                                 min_run_time)
    row["reference_ms"] = median_ms(layer(lambda a, b: quantized_linear(a, b, recipe, backend="reference")), device,
                                    min_run_time)

    def saved_per_batch(fn) -> int:
        # What grows with the tokens: the bytes kept for M rows minus those kept for none (weights, casts).
        def forward(tokens: int):
            def run():
                with _autocast(device):
                    return fn(xg[:tokens], wg)

            return run

        return saved_tensor_bytes(forward(x.shape[0]), exclude=[wg]) - saved_tensor_bytes(forward(0), exclude=[wg])

    row["saved_bytes"] = saved_per_batch(lambda a, b: quantized_linear(a, b, recipe, backend="triton"))
    row["nn_linear_saved_bytes"] = saved_per_batch(torch.nn.functional.linear)
    return row


def kernel_measurements(shape: tuple[int, int, int], recipe_names: list[str], device: torch.device,
                        min_run_time: float) -> dict[str, Any]:
    """Measure one GEMM shape on the path training takes; returns one record row of raw figures.

    Inputs as ``bitlaw-train trainer=gpu`` feeds them: bf16 activations ``[M, K]`` and the fp32 master weight
    ``[N, K]`` under bf16 autocast.

    The row: ``m, k, n``; ``scaled_mm_ms`` (``torch._scaled_mm`` of the quantizer's e4m3 codes, row-wise fp32
    scales, bf16 out) and ``bf16_mm_ms`` (``torch.mm`` of the bf16 operands); ``quantize_ms`` / ``quantize_bytes``
    (the quantizer with the ``quest_w4a4`` input spec writing codes and packed codes: bytes read + written) and
    ``copy_ms`` / ``copy_bytes`` (a device-to-device copy of the input, read + write), ``quantize_gb_s`` and
    ``copy_gb_s`` from them; ``layers``: one :func:`_layer_measurements` row per recipe of ``recipe_names``. Times
    are medians in milliseconds.
    """
    from ..kernels.triton import quant as triton_quant
    from ..kernels.triton.vendor import scaled_matmul

    w4a4 = load_recipe("quest_w4a4")
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, device=device, generator=gen) * k**-0.5  # fp32, like the master weight
    grad = torch.randn(m, n, device=device, generator=gen).to(torch.bfloat16)
    time = lambda fn: median_ms(fn, device, min_run_time)  # noqa: E731
    row: dict[str, Any] = {"m": m, "k": k, "n": n}

    xq = triton_quant.quantize_rows(x, w4a4.input, codes=True, packed=True)
    row["quantize_bytes"] = x.numel() * x.element_size() + xq.nbytes()
    row["quantize_ms"] = time(lambda: triton_quant.quantize_rows(x, w4a4.input, codes=True, packed=True))
    copy_target = torch.empty_like(x)
    row["copy_bytes"] = 2 * x.numel() * x.element_size()
    row["copy_ms"] = time(lambda: copy_target.copy_(x))
    row["quantize_gb_s"] = row["quantize_bytes"] / row["quantize_ms"] / 1e6
    row["copy_gb_s"] = row["copy_bytes"] / row["copy_ms"] / 1e6

    wq = triton_quant.quantize_rows(w, w4a4.weight, codes=True)
    scale_x, scale_w = xq.step * 0.5, wq.step * 0.5
    # The fast path's own call: torch._scaled_mm with the steps as row-wise scales.
    row["scaled_mm_ms"] = time(lambda: scaled_matmul(xq.codes, scale_x, wq.codes, scale_w, torch.bfloat16))
    w16 = w.to(torch.bfloat16).t()
    row["bf16_mm_ms"] = time(lambda: torch.mm(x, w16))
    row["layers"] = [_layer_measurements(x, w, grad, name, device, min_run_time) for name in recipe_names]
    return row


KERNEL_HEADER = ("M x K x N", "recipe", "measure", "ours", "baseline", "ratio")


def kernel_cells(row: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The table lines ``(recipe, measure, ours, baseline, ratio)`` of one :func:`kernel_measurements` row, as
    text: the shape's GEMM and quantizer, then each recipe's layer."""
    flops = 2.0 * row["m"] * row["k"] * row["n"]
    fp8_ms, bf16_ms = row["scaled_mm_ms"], row["bf16_mm_ms"]
    quant_gbs, copy_gbs = row["quantize_gb_s"], row["copy_gb_s"]
    lines = [("", "gemm ms", f"{fp8_ms:.4g} fp8", f"{bf16_ms:.4g} bf16", f"{fp8_ms / bf16_ms:.2f}x of bf16"),
             ("", "", _tflops(flops, fp8_ms), _tflops(flops, bf16_ms), ""),
             ("quest_w4a4", "quantize GB/s", f"{quant_gbs:.4g}", f"{copy_gbs:.4g} copy",
              f"{quant_gbs / copy_gbs:.2f} of copy")]
    for layer in row["layers"]:
        error, linear_ms, triton_ms = layer["check_rel_error"], layer["nn_linear_ms"], layer["linear_ms"]
        saved, plain = layer["saved_bytes"], layer["nn_linear_saved_bytes"]
        lines += [(layer["recipe"], "check vs reference", f"{error:.2g}", "rel. norm error",
                   "ok" if error < CHECK_TOLERANCE else "MISMATCH"),
                  ("", "linear fwd+bwd ms", f"{triton_ms:.4g}", f"{linear_ms:.4g} nn.Linear",
                   f"{triton_ms / linear_ms:.2f}x nn.Linear"),
                  ("", "", _tflops(3 * flops, triton_ms), f"{layer['reference_ms']:.4g} reference",
                   f"{layer['reference_ms'] / triton_ms:.2f}x faster"),
                  ("", "saved activations MiB", f"{saved / 2**20:.4g}", f"{plain / 2**20:.4g} nn.Linear",
                   f"{saved / plain:.3f} of nn.Linear")]
    return lines


def kernel_table(shapes: list[tuple[int, int, int]], recipe_names: list[str], device: torch.device,
                 min_run_time: float) -> list[dict[str, Any]]:
    """Print the kernel table (see the module docstring) for every shape; returns the measured rows."""
    header = f"{'M x K x N':>20} {'recipe':>16} {'measure':>22} {'ours':>12} {'baseline':>20} {'ratio':>20}"
    print(header)
    print("-" * len(header))
    rows = []
    for shape in shapes:
        dims = "x".join(map(str, shape))
        row = kernel_measurements(shape, recipe_names, device, min_run_time)
        rows.append(row)
        for recipe, what, ours, base, ratio in kernel_cells(row):
            print(f"{dims:>20} {recipe:>16} {what:>22} {ours:>12} {base:>20} {ratio:>20}")
    return rows


def render(record: BenchmarkRecord) -> str:
    """The Markdown body of a ``kernels-gpu`` or ``kernels-reference-cpu`` record's section of BENCHMARKS.md."""
    if record.benchmark == "kernels-reference-cpu":
        table = markdown.table(REFERENCE_HEADER, [reference_cells(row) for row in record.rows], "llrrr")
        return (f"Forward + backward of one layer on the reference path ({record.notes['path']}) vs `nn.Linear`, "
                f"{record.notes['dtype']}; medians of {record.notes['timer']}, at least "
                f"{record.notes['min_run_time']} s per measurement; ratio = quantized / nn.Linear.\n\n{table}\n")
    if record.benchmark == "kernels-gpu":
        lines = [(_dims(row) if i == 0 else "", *cells)
                 for row in record.rows for i, cells in enumerate(kernel_cells(row))]
        table = markdown.table(KERNEL_HEADER, lines, "lllrrr")
        return (f"Per GEMM shape of the 800M block (tokens × in × out), {record.notes['operands']}; medians of "
                f"{record.notes['timer']}, measured side by side. `gemm`: `torch._scaled_mm` on the quantizer's "
                "e4m3 codes with row-wise scales (bf16 out) against bf16 `torch.mm` (ratio: fp8 time over bf16 "
                "time); `quantize`: the fused quantizer (`quest_w4a4` input), bytes read + written per second beside "
                "a copy of the input; per recipe, `check`: the Triton layer against the reference path (relative "
                "norm error; ok below "
                f"{record.notes['check_tolerance']:g}); `linear`: forward + backward against `nn.Linear` and the "
                f"reference path; `saved`: activation bytes kept for backward.\n\n{table}\n")
    raise ValueError(f"{MODULE}.render: benchmark {record.benchmark!r} is not allowed; allowed: kernels-gpu, "
                     "kernels-reference-cpu")


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} is not allowed; allowed: MxKxN with positive integers, "
                                         "e.g. 16384x2048x5632")
    m, k, n = (int(p) for p in parts)
    return m, k, n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the reference path on the CPU even if CUDA is available")
    parser.add_argument("--triton", action="store_true",
                        help="the kernel table on the CPU (needs TRITON_INTERPRET=1; only proves it runs; no record)")
    parser.add_argument("--shapes", nargs="+", type=_shape, help="MxKxN layer shapes (default: per device)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--recipes", nargs="+", help="quant presets to time")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    if args.cpu and args.triton:
        parser.error("--cpu (reference path) and --triton (kernel table) exclude each other")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.triton and not interpreted:
        parser.error("--triton on the CPU runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    use_cuda = torch.cuda.is_available() and not args.cpu and not interpreted
    device = torch.device("cuda" if use_cuda else "cpu")
    name = torch.cuda.get_device_name() if use_cuda else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {name}, threads: {torch.get_num_threads()}, torch {torch.__version__}")
    if use_cuda or args.triton:
        import triton

        print(f"triton {triton.__version__}; bf16 inputs; medians of "
              f"{'triton.testing.do_bench' if use_cuda else 'torch.utils.benchmark (interpreter: not kernel speed)'}")
        shapes = args.shapes or (GPU_SHAPES if use_cuda else INTERPRETER_SHAPES)
        rows = kernel_table(shapes, args.recipes or KERNEL_RECIPES, device, args.min_run_time)
        if not use_cuda:
            return  # interpreted: the timings are numpy's, not the kernels'
        record = BenchmarkRecord(
            benchmark="kernels-gpu", title="fp8 GEMM and fused quantizer vs bf16 cuBLAS and a copy, GPU",
            kind="measured",
            module=MODULE, command=command_line(MODULE, argv), rows=rows,
            notes={"operands": "bf16 activations and the fp32 master weight under bf16 autocast (as training)",
                   "timer": "triton.testing.do_bench", "min_run_time": args.min_run_time,
                   "check_tolerance": CHECK_TOLERANCE})
    else:
        print("fp32")
        rows = reference_table(args.shapes or CPU_SHAPES, args.recipes or RECIPES, device, torch.float32,
                               args.min_run_time)
        record = BenchmarkRecord(
            benchmark="kernels-reference-cpu", title="Quantized linear vs nn.Linear, CPU reference path",
            kind="measured", module=MODULE, command=command_line(MODULE, argv), rows=rows,
            notes={"path": "kernels.quantizers", "dtype": "fp32", "timer": "torch.utils.benchmark",
                   "min_run_time": args.min_run_time},
            device=f"{name}, {torch.get_num_threads()} threads")  # the CPU even where a GPU is present
    path = write_record(record, record_directory(args))
    if path is not None:
        print(f"record: {path}")


if __name__ == "__main__":
    main()
