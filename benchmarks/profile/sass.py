"""Compiling a kernel configuration ahead of time for a GPU target on the CPU, and reading its SASS.

No GPU is needed: Triton compiles for a named target, and the ``ptxas``, ``cuobjdump`` and ``nvdisasm`` that ship in
its wheel turn the result into registers, spill stack, shared memory and SASS. Per loop of the SASS (a backward
branch; the whole body when there is none) a :class:`Loop` counts the instructions, the tensor-core and asynchronous
copy instructions, the global loads and the issue-slot model of docs/kernels.md §2.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .variants import TARGETS, Variant, kernel_fn, variants

# Dense tensor-core operations per clock per SM (docs/kernels.md §2): H100 and A100.
MMA_RATE = {90: {"bf16": 4096, "tf32": 2048, "int8": 8192, "fp8": 8192},
            80: {"bf16": 2048, "tf32": 1024, "int8": 4096, "fp8": 4096}}
TENSOR_PREFIXES = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA")
ASYNC_PREFIXES = ("LDGSTS", "UTMALDG", "UBLKCP")


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
    # wgmma groups left in flight at the loop's tightest wait (the N of ``WARPGROUP.DEPBAR.LE gsb0, N``); None
    # without wgmma. 0: each group is waited for before the loop goes on.
    wgmma_in_flight: int | None = None


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
    error: str | None = None
    instructions_per_input_byte: float | None = None  # all loops together (memory-bound kernels)
    ctas_per_sm: int = 0  # occupancy: CTAs resident per multiprocessor (:func:`ctas_per_sm`)


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


def _wgmma_in_flight(instructions: Sequence[str]) -> int | None:
    """The smallest N of the ``WARPGROUP.DEPBAR.LE gsb0, N`` waits among ``instructions`` (None without wgmma)."""
    if not any(text.startswith(("HGMMA", "IGMMA", "QGMMA")) for text in instructions):
        return None
    depths = [int(found.group(1), 16) for text in instructions
              if (found := re.match(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", text))]
    return min(depths) if depths else None


# What one Hopper / Ampere multiprocessor holds (CUDA occupancy rules): registers, warps, CTAs, shared memory
# (bytes usable by CTAs, each also taking 1 KB the runtime reserves).
SM_LIMITS = {90: {"registers": 65536, "warps": 64, "ctas": 32, "shared": 233472},
             80: {"registers": 65536, "warps": 64, "ctas": 32, "shared": 167936}}


def ctas_per_sm(registers: int, warps: int, shared: int, capability: int) -> int:
    """CTAs of a kernel resident on one multiprocessor at once: registers (allocated per warp, per thread in
    multiples of 8), warps, the CTA limit and shared memory bound it."""
    limits = SM_LIMITS[capability]
    per_warp = -(-max(registers, 1) // 8) * 8 * 32
    bounds = [limits["ctas"], limits["warps"] // warps, limits["registers"] // (per_warp * warps)]
    if shared:
        bounds.append(limits["shared"] // (shared + 1024))
    return max(min(bounds), 0)


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
            wgmma_in_flight=_wgmma_in_flight(instructions[start:end + 1]),
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
    result = Profile(variant.kernel, variant.label, target, variant.num_warps, variant.num_stages)
    fn = kernel_fn(variant.kernel)
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
    result.ctas_per_sm = ctas_per_sm(registers, variant.num_warps, result.shared, capability)
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
