"""The layer and block estimate of docs/kernels.md §3: forward + backward time of the quantized linear against
``nn.Linear`` in bf16 on an assumed H100 (:class:`Gpu`), from the compiled profile's instruction counts.

The shapes are the 800M model's block at 16,384 tokens: its seven projections (q, k, v, o: 2048 → 2048; gate, up:
2048 → 5632; down: 5632 → 2048). :func:`block_estimate` gives each distinct projection shape and the whole block, the
time summed over the seven projections. :func:`assumptions` states what the estimate assumes, with the sources. It
is a model evaluated on compiled code, not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .sass import MMA_RATE, Loop, Profile
from .variants import torch_dtype

TOKENS = 16_384  # rows M of every projection: the tokens of one step the estimate assumes (docs/kernels.md §3)
# The 800M block (conf/model/800m.yaml: d_model 2048, 16 heads with keys and values of full width, MLP hidden 5632):
# each projection as (name, in_features K, out_features N).
BLOCK_PROJECTIONS = (("q", 2048, 2048), ("k", 2048, 2048), ("v", 2048, 2048), ("o", 2048, 2048),
                     ("gate", 2048, 5632), ("up", 2048, 5632), ("down", 5632, 2048))


@dataclass(frozen=True)
class Gpu:
    """What the estimate assumes of one GPU (H100 SXM; docs/kernels.md §3)."""

    name: str = "H100 SXM (estimate)"
    sms: int = 132
    clock: float = 1.83e9  # Hz: the clock NVIDIA's tensor-core figures are quoted at
    bytes_per_s: float = 3.0e12  # device-to-device copy measured on an H100 80 GB HBM3 (read + write)
    matmul_efficiency: float = 0.8  # share of the dense peak cuBLAS and our GEMM reach on large shapes, alike

    def peak(self, kind: str) -> float:
        """Dense tensor-core operations per second of ``kind`` (``bf16``, ``tf32``, ``int8``, ``fp8``)."""
        return MMA_RATE[90][kind] * self.sms * self.clock


def _main_loop(profiles: list[Profile], kernel: str, label: str | None = None) -> Loop | None:
    """The sm_90a loop of ``kernel`` (variant ``label``) that does its work: its longest loop with tensor-core
    instructions, else its longest; None when it is not profiled or did not compile."""
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
    from ...kernels.triton.quant import one_pass_blocks

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


# (bits, backward) of every estimate: W4A4 and W1A1 with QuEST's bf16 backward; W4A4 with int8 output gradients
# for grad_input (g8) and for both backward GEMMs (g8g8).
SETTINGS = ((4, "bf16"), (1, "bf16"), (4, "g8"), (4, "g8g8"))


def block_shapes(tokens: int = TOKENS) -> list[tuple[tuple[int, int, int], list[str]]]:
    """The distinct projection shapes ``(M, K, N)`` of the 800M block, each with the names of its projections, in
    the order of :data:`BLOCK_PROJECTIONS`."""
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for name, k, n in BLOCK_PROJECTIONS:
        shapes.setdefault((tokens, k, n), []).append(name)
    return list(shapes.items())


def block_estimate(profiles: list[Profile], bits: int = 4, backward: str = "bf16", gpu: Gpu = Gpu(),
                   tokens: int = TOKENS) -> dict[str, Any]:
    """:func:`layer_estimate` of every distinct projection shape of the 800M block (each with ``projections``, the
    names of the projections of that shape) and of the whole block: ``quantized_us`` and ``nn_linear_us`` summed
    over the seven projections (µs per step), ``ratio`` the ratio of the two sums."""
    layers = [{**layer_estimate(profiles, m, k, n, bits, gpu, backward), "projections": names}
              for (m, k, n), names in block_shapes(tokens)]
    quantized = sum(len(layer["projections"]) * sum(layer["quantized_us"].values()) for layer in layers)
    plain = sum(len(layer["projections"]) * sum(layer["nn_linear_us"].values()) for layer in layers)
    return {"bits": bits, "backward": backward, "tokens": tokens, "layers": layers, "quantized_us": quantized,
            "nn_linear_us": plain, "ratio": quantized / plain}


def assumptions(gpu: Gpu = Gpu()) -> dict[str, str]:
    """What the estimate assumes, each with where it comes from (docs/kernels.md §2-§3), computed from ``gpu``."""
    issue_rate = gpu.sms * 4 * 32 * gpu.clock
    return {
        "gpu": f"{gpu.name}: {gpu.sms} SMs at {gpu.clock / 1e9:.2f} GHz, the clock NVIDIA quotes its tensor-core "
               "rates at (NVIDIA's H100 whitepaper and datasheet)",
        "tensor_cores": f"dense tensor-core operations per SM per clock: bf16 {MMA_RATE[90]['bf16']}, int8 "
                        f"{MMA_RATE[90]['int8']} (NVIDIA's figures): peaks of {gpu.peak('bf16') / 1e12:.0f} TFLOP/s "
                        f"bf16 and {gpu.peak('int8') / 1e12:.0f} TOP/s int8",
        "matmul_efficiency": f"every GEMM, cuBLAS's and bitlaw's alike, reaches {gpu.matmul_efficiency:.0%} of its "
                             "dense peak, and is slower in proportion where the profile's issue/tensor exceeds 1: "
                             "assumed for large shapes, not measured",
        "bandwidth": f"memory passes move {gpu.bytes_per_s / 1e12:.1f} TB/s (read + write: the rate of a "
                     "device-to-device copy measured on an H100 80 GB HBM3), or run at the issue rate "
                     f"({gpu.sms} SMs × 4 schedulers × 32 threads × clock = {issue_rate:.3g} thread-instructions/s) "
                     "with the profile's instructions per byte where that is slower",
        "second_read": "where the quantizer reads a row twice (K not a power-of-two number of 128-column blocks up "
                       "to 4096), the second read is charged to HBM, although it partly hits L2",
        "nn_linear": "nn.Linear is charged three bf16 GEMMs plus autocast's cast of the fp32 weight to bf16 and of "
                     "its bf16 weight gradient back to fp32",
        "block": f"a block is its seven projections at M = {TOKENS:,} tokens, each quantizing its own input as the "
                 "code runs it; attention, norms and activations are not counted; its ratio is the ratio of the "
                 "summed times",
    }
