"""What the static profile compiles: every kernel configuration the code launches for the presets, per GPU generation.

A :class:`Variant` names the kernel, its argument types, its constexprs and its launch shape, as the launching code
(``kernels/triton``) picks them for a GPU of a given compute capability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The compile targets and their compute capability: Hopper (H100) and Ampere (A100).
TARGETS = {"sm_90a": 90, "sm_80": 80}


@dataclass
class Variant:
    """One launchable kernel configuration: which kernel, with which argument types, constexprs and launch shape.

    ``read_bytes`` / ``written_bytes``: global memory the kernel reads / writes per iteration of its main loop (per
    program when it has no loop): the denominators of instructions per byte (every profiled kernel is a memory pass:
    the GEMMs are the vendor's).
    """

    kernel: str
    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    read_bytes: int
    written_bytes: int


def _ints(names: Sequence[str]) -> dict[str, str]:
    return {name: "i32" for name in names}


def variants(capability: int = 90) -> list[Variant]:
    """Every configuration the code launches for the presets on a GPU of ``capability`` (see the module
    docstring): the launch shapes are those the code picks for that generation."""
    from ...kernels.packing import field_bits
    from ...kernels.triton import backward, quant

    out: list[Variant] = []
    # The quantizer: (label, input dtype, bits, GEMM codes too, K), as quantized_linear calls it: in two passes
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
        signature = {"x_ptr": f"*{dtype}", "signs_ptr": "*bf16", "codes_ptr": "*u8", "packed_ptr": "*u8",
                     "mask_ptr": "*u8", "step_ptr": "*fp32",
                     **_ints(["M", "K", "stride_x", "stride_codes", "stride_packed", "stride_mask"]),
                     "gaussian_scale": "fp32", "mask_coef": "fp32", "inv_sqrt_block": "fp32", "chunk": "i32"}
        # CODES: 2 writes e4m3 codes (grids of up to 4 bits, the operand of torch._scaled_mm), 0 none.
        constexprs = {"BITS": bits, "FIELD_BITS": field_bits(2**bits), "CODES": 2 if codes else 0, "ROTATE": True,
                      "EVEN_K": True, "DOT": 1 if dtype == "bf16" else 2, "BLOCK_M": block_m, "BLOCKS": blocks}
        elements = block_m * 128 * max(blocks, 1)  # per iteration of each loop; one pass: the program's rows
        written = elements * ((1 if codes else 0) + field_bits(2**bits) / 8 + 1 / 8)
        out.append(Variant("quantize", label, signature, constexprs, warps, stages,
                           elements * (2 if dtype == "bf16" else 4), int(written)))
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
    """The quantized backward's passes (``kernels/triton/grad_gemm.py``) as the fp8 row-scaled preset launches
    them: e4m3 gradients for both GEMMs, stochastic rounding; the GEMMs themselves are the vendor's."""
    from ...kernels.triton import grad_gemm

    both = {"DO_IN": True, "DO_W": True}
    tile = grad_gemm.TILE * grad_gemm.TILE
    signature = {"g_ptr": "*bf16", **_ints(["stride_gm"]), "unit_in_ptr": "*fp32", "unit_w_ptr": "*fp32",
                 "amax_in_ptr": "*fp32", "amax_w_ptr": "*fp32", **_ints(["M", "N"])}
    out = [Variant("amax_grad", "amax of g_y per token and per channel", signature, {"stride_gn": 1, **both},
                   grad_gemm.QUANT_WARPS, 1, tile * 2, 0)]
    signature = {"g_ptr": "*bf16", **_ints(["stride_gm"]), "unit_in_ptr": "*fp32", "unit_w_ptr": "*fp32",
                 "amax_in_ptr": "*fp32", "amax_w_ptr": "*fp32", "qin_ptr": "*u8", "sin_ptr": "*fp32",
                 "qw_ptr": "*u8", "sw_ptr": "*fp32", **_ints(["M", "N"]), "key": "u32", "largest_in": "fp32",
                 "largest_w": "fp32"}
    e4m3 = grad_gemm.FORMAT_IDS["fp8_e4m3"]
    constexprs = {"stride_gn": 1, **both, "FORMAT_IN": e4m3, "FORMAT_W": e4m3, "SR_IN": True, "SR_W": True,
                  "ROWS": grad_gemm.QUANT_ROWS}
    rounding_tile = grad_gemm.QUANT_ROWS * grad_gemm.TILE
    out.append(Variant("quantize_grad", "g_y → e4m3 for g_x and g_w (row-wise scales)", signature, constexprs,
                       grad_gemm.ROUND_WARPS, 1, rounding_tile * 2, rounding_tile * 2))
    signature = {"packed_ptr": "*u8", "out_ptr": "*u8", **_ints(["R", "K", "stride_packed"])}
    out.append(Variant("codes_t", "int4 codes → e4m3, transposed", signature,
                       {"BITS": 4, "FIELD_BITS": 4, "FP8": True, "BLOCK_R": 64}, 4, 1, 64 * 64, 64 * 128))
    return out


def torch_dtype(name: str):
    """The torch dtype of a Triton type name (``bf16``, ``fp32``)."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def kernel_fn(name: str):
    """The ``@triton.jit`` function of the kernel a :class:`Variant` names."""
    from ...kernels.triton import backward, grad_gemm, quant

    return {"quantize": quant._quantize_kernel, "dequantize": backward._dequantize_kernel,
            "masked_rotate": backward._masked_rotate_kernel, "amax_grad": grad_gemm._amax_kernel,
            "quantize_grad": grad_gemm._quantize_grad_kernel, "codes_t": grad_gemm._codes_t_kernel}[name]
