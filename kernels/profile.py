"""Static GPU profile of the Triton kernels: compiled ahead of time for Hopper (sm_90a) and Ampere (sm_80) on the CPU.

    python -m bitlaw.kernels.profile                  # the table, both targets
    python -m bitlaw.kernels.profile --json out.json  # also every figure as JSON (the tests read it)

No GPU is needed: Triton compiles for a named target, and the ``ptxas``, ``cuobjdump`` and ``nvdisasm`` that ship in
its wheel turn the result into registers, spill stack, shared memory and SASS. For every configuration the code can
launch — each tile configuration the GEMM autotuner may select, and each variant of the fixed-configuration kernels
that the presets use — the table reports, per loop of the kernel (or its whole body when it has none):

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

Then the same model estimates a whole layer's forward + backward against ``nn.Linear`` in bf16 (docs/kernels.md §3).
All of it is an estimate from compiled code, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TARGETS = {"sm_90a": 90, "sm_80": 80}
# Dense tensor-core operations per clock per SM (docs/kernels.md §2): H100 and A100.
MMA_RATE = {90: {"bf16": 4096, "tf32": 2048, "int8": 8192, "fp8": 8192},
            80: {"bf16": 2048, "tf32": 1024, "int8": 4096, "fp8": 4096}}
TENSOR_PREFIXES = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA")
ASYNC_PREFIXES = ("LDGSTS", "UTMALDG", "UBLKCP")


@dataclass
class Variant:
    """One launchable kernel configuration: which kernel, with which argument types, constexprs and launch shape.

    ``read_bytes`` / ``written_bytes``: global memory the kernel reads / writes per iteration of its main loop (per
    program when it has no loop): the denominators of instructions per byte for memory-bound kernels. ``gemm``: True
    for the K-loop GEMM.
    """

    kernel: str
    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    read_bytes: int
    written_bytes: int
    gemm: bool = False


@dataclass
class Loop:
    """One loop of a compiled kernel (``body``: the whole kernel when it has no loop)."""

    name: str
    instructions: int
    mma: dict[str, int]  # tensor-core mnemonic → count per iteration
    async_copies: int
    vector_loads: int
    scalar_loads: int
    local_memory: int  # STL/LDL: spill traffic
    issue_cycles: float
    tensor_cycles: float
    instructions_per_input_byte: float | None  # thread-instructions per byte read (memory-bound kernels)
    instructions_per_byte_moved: float | None  # per byte read or written


@dataclass
class Profile:
    """The compiled profile of one :class:`Variant` on one target."""

    kernel: str
    label: str
    target: str
    num_warps: int
    num_stages: int
    registers: int = 0
    stack: int = 0
    shared: int = 0
    loops: list[Loop] = field(default_factory=list)
    gemm: bool = False
    error: str | None = None
    instructions_per_input_byte: float | None = None  # all loops together (memory-bound kernels)


def nvidia_tools() -> Path | None:
    """The folder of ``cuobjdump``/``nvdisasm`` in the installed Triton wheel, or None when the NVIDIA backend or
    its binaries are missing (the profile then cannot run)."""
    try:
        import triton
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return None
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return folder if all((folder / tool).is_file() for tool in ("ptxas", "cuobjdump", "nvdisasm")) else None


def _ints(names: Sequence[str]) -> dict[str, str]:
    return {name: "i32" for name in names}


def variants(capability: int = 90) -> list[Variant]:
    """Every configuration the code launches for the presets on a GPU of ``capability`` (see the module
    docstring): the launch shapes are those the code picks for that generation."""
    from .packing import field_bits
    from .triton import backward, gemm, quant

    out: list[Variant] = []
    # The quantizer: (label, input dtype, bits, int8 codes too, K), as quantized_linear calls it: in two passes
    # (any K; K = 0 here) and in one (K = 2048, the rows of the layer estimate's shapes, where the GPU allows).
    for label, dtype, bits, codes, k in (
            ("w4a4 input (bf16)", "bf16", 4, True, 0), ("w4a4 weight (fp32 master)", "fp32", 4, True, 0),
            ("w1a1 input (bf16)", "bf16", 1, True, 0), ("w1a1 weight (fp32 master)", "fp32", 1, True, 0),
            ("w2a2 input (bf16)", "bf16", 2, True, 0), ("w3a3 input (bf16)", "bf16", 3, True, 0),
            ("w4 weight-only (fp32)", "fp32", 4, False, 0),
            ("w4a4 input (bf16), one pass, K 2048", "bf16", 4, True, 2048),
            ("w4a4 weight (fp32 master), one pass, K 2048", "fp32", 4, True, 2048),
            ("w1a1 input (bf16), one pass, K 2048", "bf16", 1, True, 2048)):
        block_m, warps, stages, blocks = quant.launch_config(torch_dtype(dtype), capability, k)
        if k and not blocks:
            continue  # this GPU reads such rows in two passes: the variants above
        signature = {"x_ptr": f"*{dtype}", "signs_ptr": "*bf16", "codes_ptr": "*i8", "packed_ptr": "*u8",
                     "mask_ptr": "*u8", "step_ptr": "*fp32",
                     **_ints(["M", "K", "stride_x", "stride_codes", "stride_packed", "stride_mask"]),
                     "gaussian_scale": "fp32", "mask_coef": "fp32", "inv_sqrt_block": "fp32"}
        constexprs = {"BITS": bits, "FIELD_BITS": field_bits(2**bits), "WRITE_CODES": codes, "ROTATE": True,
                      "EVEN_K": True, "DOT": 1 if dtype == "bf16" else 2, "BLOCK_M": block_m, "BLOCKS": blocks}
        elements = block_m * 128 * max(blocks, 1)  # per iteration of each loop; one pass: the program's rows
        written = elements * ((1 if codes else 0) + field_bits(2**bits) / 8 + 1 / 8)
        out.append(Variant("quantize", label, signature, constexprs, warps, stages,
                           elements * (2 if dtype == "bf16" else 4), int(written)))
    # The forward GEMM: every configuration its autotuner may select on this generation.
    for config in gemm.configs_for(capability):
        meta = config.kwargs
        signature = {"cx_ptr": "*i8", "cw_ptr": "*i8", "sx_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": "*fp32",
                     "out_ptr": "*bf16", **_ints(["M", "N", "K", "M_BUCKET", "stride_cx", "stride_cw", "stride_out"])}
        label = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}"
        out.append(Variant("gemm", label, signature, {"HAS_BIAS": False, "EVEN_K": True, **meta}, config.num_warps,
                           config.num_stages, (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"], 0, gemm=True))
    # The backward passes around cuBLAS (one 128-column block per program).
    rows, warps = backward.pass_launch(capability)  # the dequantizer rotates with bf16 dots
    for label, out_dtype, bits, rotate in (("x̂ for g_w (w4a4, bf16)", "bf16", 4, False),
                                           ("x̂ for g_w (w1a1, bf16)", "bf16", 1, False),
                                           ("ŵ for g_x (w4a4, fp32 training)", "fp32", 4, False),
                                           ("w4 weight-only, rotated back", "fp32", 4, True)):
        signature = {"packed_ptr": "*u8", "step_ptr": "*fp32", "signs_ptr": "*bf16", "out_ptr": f"*{out_dtype}",
                     **_ints(["R", "K", "stride_packed", "stride_out"]), "inv_sqrt_block": "fp32"}
        constexprs = {"BITS": bits, "FIELD_BITS": field_bits(2**bits), "ROTATE": rotate, "EVEN_K": True, "DOT": 1,
                      "BLOCK_R": rows}
        out.append(Variant("dequantize", label, signature, constexprs, warps, 3,
                           rows * 128 * field_bits(2**bits) // 8, rows * 128 * (2 if out_dtype == "bf16" else 4)))
    for label, grad_dtype, out_dtype in (("g_x: mask + IHT (bf16)", "bf16", "bf16"),
                                         ("g_w: mask + IHT (bf16 → fp32)", "bf16", "fp32"),
                                         ("g_x: mask + IHT (fp32 training)", "fp32", "fp32")):
        signature = {"g_ptr": f"*{grad_dtype}", **_ints(["stride_gr"]), "mask_ptr": "*u8",
                     **_ints(["stride_mask"]), "signs_ptr": "*bf16", "out_ptr": f"*{out_dtype}",
                     **_ints(["stride_out", "R", "K"]), "inv_sqrt_block": "fp32"}
        dot = 1 if grad_dtype == "bf16" else 2
        rows, warps = backward.pass_launch(capability, dot)
        constexprs = {"stride_gk": 1, "ROTATE": True, "EVEN_K": True, "DOT": dot, "BLOCK_R": rows}
        out.append(Variant("masked_rotate", label, signature, constexprs, warps, 3,
                           rows * 128 * (2 if grad_dtype == "bf16" else 4) + rows * 16,
                           rows * 128 * (2 if out_dtype == "bf16" else 4)))
    out.extend(_grad_variants(capability))
    return out


def _grad_variants(capability: int) -> list[Variant]:
    """The quantized backward's kernels (bitlaw.kernels.triton.grad_gemm) as the int8-gradient presets launch them."""
    from .triton import grad_gemm

    out = []
    for label, do_in, do_w in (("g_y → int8 for g_x and g_w (g8g8)", True, True), ("g_y → int8 for g_x (g8)", True,
                                                                                    False)):
        signature = {"g_ptr": "*bf16", **_ints(["stride_gm"]), "unit_in_ptr": "*fp32",
                     "unit_w_ptr": "*fp32", "qin_ptr": "*i8", "sin_ptr": "*fp32", "qw_ptr": "*i8", "sw_ptr": "*fp32",
                     **_ints(["M", "N"]), "key": "u32"}
        constexprs = {"stride_gn": 1, "DO_IN": do_in, "DO_W": do_w, "SR_IN": True, "SR_W": True}
        out.append(Variant("quantize_grad", label, signature, constexprs, grad_gemm.QUANT_WARPS, 1, 128 * 128 * 2,
                           128 * 128 * (do_in + do_w)))
    signature = {"packed_ptr": "*u8", "out_ptr": "*i8", **_ints(["R", "K", "stride_packed"])}
    out.append(Variant("codes_t", "int4 codes → int8, transposed", signature,
                       {"BITS": 4, "FIELD_BITS": 4, "BLOCK_R": 64}, 4, 1, 64 * 64, 64 * 128))
    block_m, warps, stages = grad_gemm.GEMM_LAUNCH[90 if capability >= 90 else 80]
    # bf16 training: the rotation reads the bf16 output gradient's sums with one bf16 dot (DOT 1) in both GEMMs.
    for label, out_dtype, dot in (("g_x (bf16 g_y, bf16 out)", "bf16", 1), ("g_w (bf16 g_y, fp32 out)", "fp32", 1)):
        signature = {"a_ptr": "*i8", "sa_ptr": "*fp32", "b_ptr": "*i8", "mask_ptr": "*u8", "stride_mask": "i32",
                     "signs_ptr": "*bf16", "out_ptr": f"*{out_dtype}", **_ints(["R", "C", "RED"]),
                     "inv_sqrt_block": "fp32"}
        constexprs = {"ROTATE": True, "DOT": dot, "EVEN_RED": True, "BLOCK_M": block_m}
        out.append(Variant("grad_gemm", f"{block_m}x128x128 {label}", signature, constexprs, warps, stages,
                           (block_m + 128) * 128, 0, gemm=True))
    return out


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _kernel_fn(name: str):
    from .triton import backward, gemm, grad_gemm, quant

    return {"quantize": quant._quantize_kernel, "gemm": gemm._gemm_kernel.fn,
            "dequantize": backward._dequantize_kernel, "masked_rotate": backward._masked_rotate_kernel,
            "quantize_grad": grad_gemm._quantize_grad_kernel, "codes_t": grad_gemm._codes_t_kernel,
            "grad_gemm": grad_gemm._block_scaled_gemm_kernel}[name]


_MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def _mma_ops(mnemonic: str, warps: int) -> tuple[str, float]:
    """(rate class, operations of one issue of ``mnemonic`` summed over the CTA's warps)."""
    kind = ("int8" if re.search(r"\.(S8|U8)", mnemonic) else "tf32" if ".TF32" in mnemonic
            else "fp8" if re.search(r"E4M3|E5M2", mnemonic) else "bf16")
    shape = _MMA_SHAPE.search(mnemonic)
    if shape:  # wgmma: one instruction per warpgroup of 4 warps, m×n×k each
        m, n, k = map(int, shape.groups())
        return kind, 2.0 * m * n * k * warps / 4
    digits = re.search(r"MMA\.(\d{2})(\d)(\d+)", mnemonic)  # mma.sync: m16 n8 kK per warp
    m, n, k = int(digits.group(1)), int(digits.group(2)), int(digits.group(3))
    return kind, 2.0 * m * n * k * warps


def analyse_cubin(cubin: bytes, tools: Path, warps: int, capability: int, read_bytes: int, written_bytes: int
                  ) -> tuple[int, int, int, list[Loop]]:
    """(registers, stack bytes, static shared bytes, loops) of a compiled kernel, read from its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", handle.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", handle.name], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if op:
            instructions.append(re.sub(r"^@!?U?P[T\d]+\s+", "", op.group(1)))
    spans = []
    for index, text in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        # A backward branch closes a loop (a branch to itself is the trap at the end of every kernel).
        if target and target.group(1) in labels and labels[target.group(1)] < index:
            spans.append((labels[target.group(1)], index))
    spans = spans or [(0, len(instructions) - 1)]
    loops = []
    for number, (start, end) in enumerate(spans):
        body = [text.split()[0] for text in instructions[start:end + 1]]
        counts = Counter(body)
        mma = {op: count for op, count in counts.items() if op.startswith(TENSOR_PREFIXES)}
        flops, tensor_cycles = 0.0, 0.0
        for op, count in mma.items():
            kind, ops = _mma_ops(op, warps)
            flops += count * ops
            tensor_cycles += count * ops / MMA_RATE[capability][kind]
        loads = {op: count for op, count in counts.items() if op.startswith("LDG.") or op == "LDG"}
        vector = sum(count for op, count in loads.items() if re.search(r"\.(64|128|256)", op))
        name = "body" if len(spans) == 1 and spans[0] == (0, len(instructions) - 1) else f"loop {number + 1}"
        threads = warps * 32
        # Per-byte figures for the loop that does the kernel's work: the one with the tensor-core instructions (the
        # quantizer's first loop only sums squares), or the body of a loop-free pass.
        main = bool(mma) or name == "body"
        loops.append(Loop(
            name=name, instructions=len(body), mma=mma,
            async_copies=sum(count for op, count in counts.items() if op.startswith(ASYNC_PREFIXES)),
            vector_loads=vector, scalar_loads=sum(loads.values()) - vector,
            local_memory=sum(count for op, count in counts.items() if op.startswith(("STL", "LDL"))),
            issue_cycles=len(body) * warps / 4, tensor_cycles=tensor_cycles,
            instructions_per_input_byte=threads * len(body) / read_bytes if main else None,
            instructions_per_byte_moved=threads * len(body) / (read_bytes + written_bytes) if main else None))
    return registers, stack, static_shared, loops


def profile_variant(variant: Variant, target: str) -> Profile:
    """Compile ``variant`` for ``target`` and read its profile (the error text when it does not compile)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns until the default is chosen
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = TARGETS[target]
    result = Profile(variant.kernel, variant.label, target, variant.num_warps, variant.num_stages, gemm=variant.gemm)
    fn = _kernel_fn(variant.kernel)
    signature = {name: variant.signature.get(name, "constexpr") for name in fn.arg_names}
    # Pointers and the integer sizes and strides of the training shapes are multiples of 16, as Triton specializes
    # them at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or signature[name] == "i32"}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    except Exception as err:  # noqa: BLE001 - reported per variant: the profile lists what does not compile
        result.error = f"{type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}"
        return result
    tools = nvidia_tools()
    registers, stack, static_shared, loops = analyse_cubin(compiled.asm["cubin"], tools, variant.num_warps,
                                                           capability, variant.read_bytes, variant.written_bytes)
    result.registers, result.stack, result.loops = registers, stack, loops
    result.shared = static_shared + int(compiled.metadata.shared)
    if not variant.gemm:
        # Each loop of these kernels reads the input once per iteration (the quantizer's two passes both do).
        result.instructions_per_input_byte = sum(loop.instructions for loop in loops) * variant.num_warps * 32 \
            / variant.read_bytes
    return result


def _job(args: tuple[int, str]) -> Profile:
    index, target = args
    return profile_variant(variants(TARGETS[target])[index], target)


def run_profile(targets: Sequence[str] = tuple(TARGETS), jobs: int = 2) -> list[Profile]:
    """Profiles of every :func:`variants` entry on each target, compiled ``jobs`` at a time in worker processes."""
    work = [(index, target) for target in targets for index in range(len(variants(TARGETS[target])))]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(_job, work))


# ---- the layer estimate of docs/kernels.md §3 ----

@dataclass(frozen=True)
class Gpu:
    """What the estimate assumes of one GPU (H100 SXM; docs/kernels.md §3)."""

    name: str = "H100 SXM (estimate)"
    sms: int = 132
    clock: float = 1.83e9  # Hz: the clock NVIDIA's tensor-core figures are quoted at
    bytes_per_s: float = 3.0e12  # device-to-device copy measured on an H100 80 GB HBM3 (read + write)
    matmul_efficiency: float = 0.8  # share of the dense peak cuBLAS and our GEMM reach on large shapes, alike

    def peak(self, kind: str) -> float:
        return MMA_RATE[90][kind] * self.sms * self.clock


def _main_loop(profiles: list[Profile], kernel: str, label: str | None = None) -> Loop | None:
    for item in profiles:
        if item.target == "sm_90a" and item.kernel == kernel and (label is None or item.label == label) and \
                not item.error:
            loops = [loop for loop in item.loops if loop.mma] or item.loops
            return max(loops, key=lambda loop: loop.instructions)
    return None


BACKWARDS = ("bf16", "g8", "g8g8")  # the layer estimate's backward: QuEST's, int8 grad_input, int8 both GEMMs


def layer_estimate(profiles: list[Profile], m: int, k: int, n: int, bits: int = 4, gpu: Gpu = Gpu(),
                   backward: str = "bf16") -> dict[str, Any]:
    """Estimated forward + backward time (µs) of one quantized linear (``bits``-bit weights and inputs) and of
    ``nn.Linear`` under bf16 autocast at ``M x K x N``, per step, with the model of docs/kernels.md §3.
    ``backward``: ``bf16`` (QuEST's: dequantize, cuBLAS, mask + IHT), ``g8`` (int8 ``g_y`` for ``g_x``, the preset
    ``quest_w4a4_g8``), ``g8g8`` (int8 ``g_y`` for both GEMMs, ``quest_w4a4_g8g8``)."""
    if backward not in BACKWARDS:
        raise ValueError(f"layer_estimate: backward={backward!r} is not allowed; allowed: {', '.join(BACKWARDS)}")
    field_bytes = {1: 1 / 8, 2: 2 / 8, 3: 4 / 8, 4: 4 / 8}[bits]
    issue_rate = gpu.sms * 4 * 32 * gpu.clock  # thread-instructions per second

    def memory(read: float, write: float, instructions_per_byte: float | None = None) -> float:
        seconds = (read + write) / gpu.bytes_per_s
        if instructions_per_byte is not None:
            seconds = max(seconds, read * instructions_per_byte / issue_rate)
        return seconds * 1e6

    def matmul(kind: str, issue_ratio: float = 1.0) -> float:
        return 2.0 * m * k * n / (gpu.peak(kind) * gpu.matmul_efficiency) * max(1.0, issue_ratio) * 1e6

    def ratio(loop: Loop | None) -> float:
        return loop.issue_cycles / loop.tensor_cycles if loop else 1.0

    def rotation(rows: int, dots: int) -> float:
        # The epilogue's inverse Hadamard: per 128-column tile a dot of rows × 128 × 128 against ±1, ``dots`` bf16
        # dots (1 in bf16 training).
        return 2.0 * rows * k * 128 * dots / (gpu.peak("bf16") * gpu.matmul_efficiency) * 1e6

    label = {4: "w4a4", 1: "w1a1", 2: "w2a2", 3: "w3a3"}[bits]
    # Rows are read once where the quantizer takes one pass on Hopper (quant.one_pass_blocks), at the instruction
    # rate the profile measured at K = 2048; else twice.
    from .triton.quant import one_pass_blocks

    one_x = one_pass_blocks(k, torch_dtype("bf16"), 90) and \
        _main_loop(profiles, "quantize", f"{label} input (bf16), one pass, K 2048")
    one_w = one_pass_blocks(k, torch_dtype("fp32"), 90) and \
        _main_loop(profiles, "quantize", "w4a4 weight (fp32 master), one pass, K 2048")
    quant_x = one_x or _main_loop(profiles, "quantize", f"{label} input (bf16)")
    quant_w = one_w or _main_loop(profiles, "quantize", f"{label} weight (fp32 master)") or \
        _main_loop(profiles, "quantize", "w4a4 weight (fp32 master)")
    reads_x, reads_w = (2 if one_x else 4), (4 if one_w else 8)
    gemm = _main_loop(profiles, "gemm", "128x256x128")
    rotate_bf16 = _main_loop(profiles, "masked_rotate", "g_x: mask + IHT (bf16)")
    rotate_w = _main_loop(profiles, "masked_rotate", "g_w: mask + IHT (bf16 → fp32)")
    per_byte = lambda loop: loop.instructions_per_input_byte if loop else None  # noqa: E731
    mask_bytes, code_bytes = 1 / 8, 1 + field_bytes
    ours = {
        # In two passes, pass 1 reads the rows for the RMS, pass 2 again (counted from HBM both times, though partly
        # L2); in one pass they are read once.
        "quantize x": memory(reads_x * m * k, (code_bytes + mask_bytes) * m * k + 4 * m, per_byte(quant_x)),
        "quantize w": memory(reads_w * n * k, (code_bytes + mask_bytes) * n * k + 4 * n, per_byte(quant_w)),
        "int8 GEMM": matmul("int8", ratio(gemm)),
    }
    if backward == "bf16":
        ours |= {"dequantize ŵ": memory(field_bytes * n * k, 2 * n * k), "g_y·ŵ (cuBLAS)": matmul("bf16"),
                 "mask + IHT g_x": memory((2 + mask_bytes) * m * k, 2 * m * k, per_byte(rotate_bf16))}
    else:
        quant_g = _main_loop(profiles, "quantize_grad", "g_y → int8 for g_x and g_w (g8g8)" if backward == "g8g8"
                             else "g_y → int8 for g_x (g8)")
        codes_t = _main_loop(profiles, "codes_t")
        grad_x = _main_loop(profiles, "grad_gemm", "128x128x128 g_x (bf16 g_y, bf16 out)")
        outputs = 2 if backward == "g8g8" else 1  # int8 operands written, each with a scale per 128 entries
        ours |= {"quantize g_y (int8)": memory(2 * m * n, outputs * m * n * (1 + 4 / 128), per_byte(quant_g)),
                 "ŵ codes, transposed": memory(field_bytes * n * k, n * k, per_byte(codes_t)),
                 "g_y·ŵ (int8, + mask, IHT)": matmul("int8", ratio(grad_x)) + rotation(m, 1)}
    if backward == "g8g8":
        grad_w = _main_loop(profiles, "grad_gemm", "128x128x128 g_w (bf16 g_y, fp32 out)")
        ours |= {"x̂ codes, transposed": memory(field_bytes * m * k, m * k, per_byte(codes_t)),
                 "g_yᵀ·x̂ (int8, + mask, IHT)": matmul("int8", ratio(grad_w)) + rotation(n, 1)}
    else:
        ours |= {"dequantize x̂": memory(field_bytes * m * k, 2 * m * k), "g_yᵀ·x̂ (cuBLAS)": matmul("bf16"),
                 "mask + IHT g_w": memory((2 + mask_bytes) * n * k, 4 * n * k, per_byte(rotate_w))}
    plain = {
        "weight cast fp32 → bf16": memory(4 * n * k, 2 * n * k),
        "x·wᵀ (cuBLAS)": matmul("bf16"),
        "g_y·w (cuBLAS)": matmul("bf16"),
        "g_yᵀ·x (cuBLAS)": matmul("bf16"),
        "weight gradient bf16 → fp32": memory(2 * n * k, 4 * n * k),
    }
    return {"shape": [m, k, n], "bits": bits, "backward": backward, "gpu": asdict(gpu), "quantized_us": ours,
            "nn_linear_us": plain, "ratio": sum(ours.values()) / sum(plain.values())}


# ---- output ----

def _row(item: Profile, loop: Loop | None) -> str:
    if item.error:
        return (f"| {item.kernel} | {item.label} | {item.target} | {item.num_warps}/{item.num_stages} | "
                f"compile error: {item.error} |||||||||")
    mma = ", ".join(f"{count}×{op}" for op, count in loop.mma.items()) or "—"
    ratio = f"{loop.issue_cycles / loop.tensor_cycles:.2f}" if loop.tensor_cycles else "—"
    per_byte = "—"
    if loop.instructions_per_input_byte is not None and not item.gemm:
        per_byte = f"{loop.instructions_per_input_byte:.1f} / {loop.instructions_per_byte_moved:.1f}"
    return (f"| {item.kernel} | {item.label} | {item.target} | {item.num_warps}/{item.num_stages} | {item.registers} | "
            f"{item.stack} | {item.shared / 1024:.0f} | {loop.name}: {loop.instructions} | {mma} | "
            f"{loop.async_copies} | {loop.vector_loads}/{loop.scalar_loads} | {ratio} | {per_byte} |")


def markdown_table(profiles: list[Profile]) -> str:
    """The profile as a Markdown table: one row per loop of each compiled variant."""
    lines = ["| kernel | variant | target | warps/stages | regs | stack B | smem KiB | instr/iter | mma/iter | async | "
             "ldg vec/scalar | issue/tensor | instr/B in / moved |",
             "|---|---|---|---|---:|---:|---:|---|---|---:|---|---:|---:|"]
    for item in profiles:
        for loop in item.loops or [None]:
            lines.append(_row(item, loop))
    return "\n".join(lines)


def estimate_table(estimates: list[dict[str, Any]]) -> str:
    lines = ["| layer M x K x N | bits | backward | quantized µs (estimate) | nn.Linear bf16 µs (estimate) | ratio |",
             "|---|---:|---|---:|---:|---:|"]
    for item in estimates:
        shape = "x".join(map(str, item["shape"]))
        lines.append(f"| {shape} | {item['bits']} | {item['backward']} | {sum(item['quantized_us'].values()):.0f} | "
                     f"{sum(item['nn_linear_us'].values()):.0f} | {item['ratio']:.2f}x |")
    return "\n".join(lines)


LAYER_SHAPES = ((16384, 2048, 5632), (16384, 2048, 2048), (16384, 5632, 2048), (16384, 2048, 6144))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitlaw.kernels.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    if nvidia_tools() is None:
        print("bitlaw.kernels.profile: the installed triton has no NVIDIA backend with ptxas/cuobjdump/nvdisasm; "
              "nothing to profile", file=sys.stderr)
        return 2
    import triton

    profiles = run_profile(args.targets, args.jobs)
    estimates = [layer_estimate(profiles, m, k, n, bits) for m, k, n in LAYER_SHAPES for bits in (4, 1)]
    estimates += [layer_estimate(profiles, m, k, n, 4, backward=backward) for m, k, n in LAYER_SHAPES
                  for backward in BACKWARDS[1:]]
    print(f"triton {triton.__version__}; compiled for {', '.join(args.targets)} on this CPU (no GPU)")
    print(markdown_table(profiles))
    print()
    print("Layer forward + backward, estimated from the profile (docs/kernels.md §3):")
    print(estimate_table(estimates))
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "profiles": [asdict(p) for p in profiles],
                                         "estimates": estimates}, indent=1))
    failed = [p for p in profiles if p.error]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
