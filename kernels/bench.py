"""Micro-benchmark: forward+backward of one quantized linear vs ``nn.Linear``, measured side by side.

Usage: ``python -m kernels.bench --cpu`` (or on a CUDA machine without ``--cpu``: the same comparison there).
Prints one table of medians (``torch.utils.benchmark``) and ratios from a single run. Timings are never
asserted anywhere; record the table in BENCHMARKS.md with device, date and commit.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark

from kernels.quantizers import quantized_linear
from kernels.recipe import load_recipe

# (tokens M, in_features K, out_features N): the tiny model's projections and the 30M/100M ones.
CPU_SHAPES = [(1024, 256, 768), (2048, 640, 1792), (2048, 1024, 2816)]
GPU_SHAPES = [(16384, 2048, 2048), (16384, 2048, 5632), (16384, 5632, 2048)]
RECIPES = ["quest_w4a4", "quest_w1a1", "quest_w4"]


def _fwd_bwd(fn, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        x.grad = None
        w.grad = None
        fn(x, w).backward(grad)

    return run


def _median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def measure(shape: tuple[int, int, int], recipe_names: list[str], device: torch.device, dtype: torch.dtype,
            min_run_time: float) -> tuple[float, dict[str, float]]:
    """Median seconds of forward+backward at ``shape``: ``(nn.Linear, {recipe: quantized linear})``."""
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k**-0.5).requires_grad_(True)
    grad = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
    plain = _median_seconds(_fwd_bwd(torch.nn.functional.linear, x, w, grad), min_run_time)
    quant = {}
    for name in recipe_names:
        recipe = load_recipe(name)
        quant[name] = _median_seconds(_fwd_bwd(lambda a, b, r=recipe: quantized_linear(a, b, r), x, w, grad),
                                      min_run_time)
    return plain, quant


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="benchmark on the CPU even if CUDA is available")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="quant presets to time")
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    shapes = GPU_SHAPES if use_cuda else CPU_SHAPES
    name = torch.cuda.get_device_name() if use_cuda else f"{platform.processor() or platform.machine()} CPU"
    print(f"device: {name}, threads: {torch.get_num_threads()}, dtype: {dtype}, torch {torch.__version__}")
    print("path: reference PyTorch quantizers (kernels.quantizers), forward + backward of y = Q(x) Q(w)^T")
    header = f"{'M x K x N':>20} {'recipe':>12} {'nn.Linear ms':>13} {'quantized ms':>13} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        base, quant = measure(shape, args.recipes, device, dtype, args.min_run_time)
        dims = "x".join(map(str, shape))
        for recipe_name, seconds in quant.items():
            print(f"{dims:>20} {recipe_name:>12} {base * 1e3:>13.2f} {seconds * 1e3:>13.2f} {seconds / base:>6.2f}x")


if __name__ == "__main__":
    main()
