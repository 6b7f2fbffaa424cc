"""How many programs every Triton launch of an 800M training step starts, against the GPU's multiprocessors.

A launch of fewer programs than the GPU has multiprocessors leaves some idle for its whole duration, whatever the
kernel's code. The grids come from the launching code itself (``launch_grid``, ``pass_launch`` and the gradient
passes' tiles), at the shapes of one 800M block at 16,384 tokens with the projections grouped as the model runs
them (q/k/v and gate/up share one quantized input). Nothing is compiled or run.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENS = 16_384
D_MODEL, HIDDEN = 2048, 5632
# (group, in_features K, the weights' out_features): one GEMM per group.
GROUPS = (("qkv", D_MODEL, (D_MODEL, D_MODEL, D_MODEL)), ("o", D_MODEL, (D_MODEL,)),
          ("gate/up", D_MODEL, (HIDDEN, HIDDEN)), ("down", HIDDEN, (D_MODEL,)))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``programs`` started for ``tensor`` of ``shape``; ``waves`` = programs / multiprocessors."""

    kernel: str
    tensor: str
    shape: tuple[int, int]
    programs: int
    waves: float


def launches(sms: int = 132, capability: int = 90, tokens: int = TOKENS) -> list[Launch]:
    """Every Triton launch of one 800M block's forward and backward (QuEST's bf16 backward and the fp8 one) under
    bf16 autocast on a GPU of ``sms`` multiprocessors and ``capability``."""
    import torch
    import triton

    from ...kernels.triton import backward, grad_gemm, quant

    out: list[Launch] = []

    def add(kernel: str, tensor: str, shape: tuple[int, int], grid: tuple[int, ...]) -> None:
        programs = 1
        for size in grid:
            programs *= size
        out.append(Launch(kernel, tensor, shape, programs, programs / sms))

    pass_rows = {dot: backward.pass_launch(capability, dot)[0] for dot in (1, 2)}
    for group, k, outs in GROUPS:
        n = sum(outs)
        add("quantize", f"{group} input", (tokens, k), quant.launch_grid(tokens, k, torch.bfloat16, capability, sms)[0])
        for index, rows in enumerate(outs):
            add("quantize", f"{group} weight {index}", (rows, k),
                quant.launch_grid(rows, k, torch.float32, capability, sms)[0])
        add("dequantize", f"{group} ŵ", (n, k), backward._pass_grid(n, k, pass_rows[1]))
        add("dequantize", f"{group} x̂", (tokens, k), backward._pass_grid(tokens, k, pass_rows[1]))
        add("masked_rotate", f"{group} g_x", (tokens, k), backward._pass_grid(tokens, k, pass_rows[1]))
        add("masked_rotate", f"{group} g_w", (n, k), backward._pass_grid(n, k, pass_rows[1]))
        tiles = (triton.cdiv(tokens, grad_gemm.TILE), triton.cdiv(n, grad_gemm.TILE))
        add("grad_amax", f"{group} g_y", (tokens, n), tiles)
        add("quantize_grad", f"{group} g_y", (tokens, n),
            (triton.cdiv(tokens, grad_gemm.QUANT_ROWS), triton.cdiv(n, grad_gemm.TILE)))
        add("codes_t", f"{group} weight codes", (n, k), (triton.cdiv(n, 64), triton.cdiv(k, grad_gemm.TILE)))
        add("codes_t", f"{group} input codes", (tokens, k), (triton.cdiv(tokens, 64), triton.cdiv(k, grad_gemm.TILE)))
    return out
