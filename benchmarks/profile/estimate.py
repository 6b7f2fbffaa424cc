"""The block estimate of docs/kernels.md §3: forward + backward time of one whole 800M Llama block on an assumed
H100 (:class:`Gpu`) for bf16 training (``nn.Linear`` under autocast) and the two quantized designs, from the
compiled profile's instruction counts and the sourced rates of :func:`assumptions`.

The block at ``M = 16,384`` tokens (32 sequences of 512): its projections in the groups that share one quantized
input (:data:`GROUPS`: q/k/v, o, gate/up, down), causal attention at a FlashAttention-class rate, and the memory
passes around them (RMSNorms, RoPE, SiLU·mul, residual adds, autocast's casts). Every GEMM reaches one efficiency
(a share of its dense peak), a parameter: :data:`EFFICIENCIES` gives a row each. Recipes (:data:`RECIPES`):

- ``bf16``: ``nn.Linear`` under bf16 autocast: per projection the fp32 → bf16 weight cast, three bf16 GEMMs, the
  bf16 → fp32 cast of the weight gradient; the gradients of a shared input summed.
- ``quest_w4a4``: per group the fused quantizer on the input and on the weights (e4m3 codes, packed codes, mask,
  steps), one fp8 GEMM (``torch._scaled_mm``), and QuEST's 16-bit backward (dequantize, cuBLAS bf16, mask + IHT).
- ``quest_w4a4_g8g8``: the same forward; the backward quantizes the output gradient to fp8 e4m3 with row-wise
  scales (an amax pass and a quantize pass writing both operands), transposes the saved codes, and runs both
  backward GEMMs on fp8 (``torch._scaled_mm``), then mask + IHT.

It is a model evaluated on compiled code and published rates, not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .sass import MMA_RATE, Loop, Profile
from .variants import torch_dtype

TOKENS = 16_384  # rows M of every projection: 32 sequences of 512 tokens (docs/kernels.md §3)
SEQ_LEN = 512
D_MODEL, N_HEAD, HIDDEN = 2048, 16, 5632  # conf/model/800m.yaml: keys and values of full width, head dim 128
# The projection groups of a block: (name, in_features K, the out_features of each weight sharing the input).
GROUPS = (("qkv", D_MODEL, (D_MODEL, D_MODEL, D_MODEL)), ("o", D_MODEL, (D_MODEL,)),
          ("gate/up", D_MODEL, (HIDDEN, HIDDEN)), ("down", HIDDEN, (D_MODEL,)))
RECIPES = ("bf16", "quest_w4a4", "quest_w4a4_g8g8")
EFFICIENCIES = (0.6, 0.7, 0.8)
# The issue's block ratios to bf16, at 0.6 of peak for every GEMM.
RATIO_TARGETS = {"quest_w4a4": 0.92, "quest_w4a4_g8g8": 0.70}
TARGET_EFFICIENCY = 0.6


@dataclass(frozen=True)
class Gpu:
    """What the estimate assumes of one GPU (H100 SXM5 80 GB; sources in :func:`assumptions`)."""

    name: str = "H100 SXM5 80 GB (estimate)"
    sms: int = 132
    clock: float = 1.83e9  # Hz: the clock NVIDIA's tensor-core figures are quoted at
    hbm_bytes_per_s: float = 3.35e12  # NVIDIA's datasheet figure for HBM3
    achieved_bandwidth: float = 0.9  # share of it a streaming pass moves (assumed; the GPU check measures a copy)
    matmul_efficiency: float = 0.6  # share of the dense peak every GEMM reaches, bf16 and fp8 alike
    # FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608) on an H100 SXM5, head dim 128, sequence 512, in the
    # FlashAttention FLOP convention: forward with causal mask (Fig. 5), backward without one (Fig. 6).
    attention_forward_flops: float = 292e12
    attention_backward_noncausal_flops: float = 316e12
    attention_forward_noncausal_flops: float = 467e12  # Fig. 5 without causal mask: scales the backward to causal

    @property
    def bytes_per_s(self) -> float:
        """Read + write bytes per second of a memory pass."""
        return self.hbm_bytes_per_s * self.achieved_bandwidth

    @property
    def attention_backward_flops(self) -> float:
        """The causal backward rate: the paper's backward figure (no causal mask) scaled by its forward's causal /
        non-causal ratio at the same shape (the paper shows no causal backward at head dim 128)."""
        return self.attention_backward_noncausal_flops * self.attention_forward_flops \
            / self.attention_forward_noncausal_flops

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


class _Model:
    """Times in µs of the passes of one block on ``gpu``: memory passes at the bandwidth (or the issue rate of the
    profiled kernel, where slower), GEMMs at ``gpu.matmul_efficiency`` of their peak."""

    def __init__(self, profiles: list[Profile], gpu: Gpu, tokens: int):
        self.profiles, self.gpu, self.m = profiles, gpu, tokens
        self.issue_rate = gpu.sms * 4 * 32 * gpu.clock  # thread-instructions per second

    def memory(self, read: float, write: float, loop: Loop | None = None) -> float:
        seconds = (read + write) / self.gpu.bytes_per_s
        if loop is not None and loop.instructions_per_input_byte is not None:
            seconds = max(seconds, read * loop.instructions_per_input_byte / self.issue_rate)
        return seconds * 1e6

    def matmul(self, kind: str, k: int, n: int) -> float:
        return 2.0 * self.m * k * n / (self.gpu.peak(kind) * self.gpu.matmul_efficiency) * 1e6

    def loop(self, kernel: str, label: str | None = None) -> Loop | None:
        return _main_loop(self.profiles, kernel, label)

    def quantize(self, rows: int, k: int, dtype: str) -> float:
        """The fused quantizer on ``[rows, k]`` ``dtype`` rows: read once where it takes one pass on Hopper
        (``quant.one_pass_blocks``), else twice; writes e4m3 codes (1 B), packed int4 (½ B), mask (⅛ B), a step."""
        from ...kernels.triton.quant import one_pass_blocks

        size = {"bf16": 2, "fp32": 4}[dtype]
        what = "input (bf16)" if dtype == "bf16" else "weight (fp32 master)"
        one = one_pass_blocks(k, torch_dtype(dtype), 90) > 0
        loop = (self.loop("quantize", f"w4a4 {what}, one pass, K 2048") if one and k == 2048 else None) or \
            self.loop("quantize", f"w4a4 {what}")
        return self.memory((1 if one else 2) * size * rows * k, (1 + 1 / 2 + 1 / 8) * rows * k + 4 * rows, loop)


def _projections(model: _Model, recipe: str, k: int, outs: tuple[int, ...]) -> dict[str, float]:
    """The passes (µs) of one projection group: input ``[M, k]`` shared by weights of ``outs`` rows each."""
    m, n = model.m, sum(outs)
    mask = 1 / 8
    if recipe == "bf16":
        passes = {"weight casts fp32 → bf16": model.memory(4 * n * k, 2 * n * k),
                  "x·wᵀ (bf16)": model.matmul("bf16", k, n),
                  "g_y·w (bf16)": model.matmul("bf16", k, n),
                  "g_yᵀ·x (bf16)": model.matmul("bf16", k, n),
                  "weight gradients bf16 → fp32": model.memory(2 * n * k, 4 * n * k)}
        if len(outs) > 1:  # autograd sums the input's gradients from each projection
            passes["sum of the input's gradients"] = model.memory(len(outs) * 2 * m * k, 2 * m * k)
        return passes
    passes = {"quantize x": model.quantize(m, k, "bf16"),
              "quantize w": model.quantize(n, k, "fp32"),
              "x̂·ŵᵀ (fp8)": model.matmul("fp8", k, n)}
    if len(outs) > 1:  # the group's output is split into views: their gradients are joined for the one GEMM
        passes["join the output gradients"] = model.memory(2 * m * n, 2 * m * n)
    rotate_x = model.loop("masked_rotate", "g_x: mask + IHT (bf16)")
    rotate_w = model.loop("masked_rotate", "g_w: mask + IHT (bf16 → fp32)")
    if recipe == "quest_w4a4":
        passes |= {"dequantize ŵ": model.memory(n * k / 2 + 4 * n, 2 * n * k,
                                                  model.loop("dequantize", "ŵ for g_x (w4a4, fp32 training)")),
                   "g_y·ŵ (bf16)": model.matmul("bf16", k, n),
                   "dequantize x̂": model.memory(m * k / 2 + 4 * m, 2 * m * k,
                                                  model.loop("dequantize", "x̂ for g_w (w4a4, bf16)")),
                   "g_yᵀ·x̂ (bf16)": model.matmul("bf16", k, n)}
    else:
        codes_t = model.loop("codes_t")
        passes |= {"amax of g_y": model.memory(2 * m * n, 0, model.loop("amax_grad")),
                   "quantize g_y (fp8, both operands)": model.memory(2 * m * n, 2 * m * n + 4 * (m + n),
                                                                     model.loop("quantize_grad")),
                   "ŵ codes, transposed": model.memory(n * k / 2, n * k, codes_t),
                   "x̂ codes, transposed": model.memory(m * k / 2, m * k, codes_t),
                   "g_y·ŵ (fp8)": model.matmul("fp8", k, n),
                   "g_yᵀ·x̂ (fp8)": model.matmul("fp8", k, n)}
    passes |= {"mask + IHT g_x": model.memory((2 + mask) * m * k, 2 * m * k, rotate_x),
               "mask + IHT g_w": model.memory((2 + mask) * n * k, 4 * n * k, rotate_w)}
    return passes


def _attention(model: _Model) -> dict[str, float]:
    """Causal attention of ``M / 512`` sequences, 16 heads of 128: FLOPs in FlashAttention's convention
    (forward ``4·B·H·S²·D / 2`` with the causal mask, backward 2.5 times it) at :class:`Gpu`'s rates."""
    sequences, head_dim = model.m // SEQ_LEN, D_MODEL // N_HEAD
    forward = 4.0 * sequences * N_HEAD * SEQ_LEN**2 * head_dim / 2
    return {"attention forward": forward / model.gpu.attention_forward_flops * 1e6,
            "attention backward": 2.5 * forward / model.gpu.attention_backward_flops * 1e6}


def _elementwise(model: _Model) -> dict[str, float]:
    """The memory passes around the projections and attention, each as one fused pass (read its inputs once,
    write its outputs once). The residual stream is fp32 (autocast leaves the embedding and the adds in fp32),
    activations bf16; the same for every recipe."""
    m, d, h = model.m, D_MODEL, HIDDEN
    md, mh = m * d, m * h
    return {
        "RMSNorms + casts to bf16 (2)": 2 * model.memory(4 * md, 2 * md),
        "RoPE on q, k": model.memory(2 * 2 * md, 2 * 2 * md),
        "SiLU·mul": model.memory(2 * 2 * mh, 2 * mh),
        "residual adds (2)": 2 * model.memory((4 + 2) * md, 4 * md),
        "residual gradients → bf16 (2)": 2 * model.memory(4 * md, 2 * md),
        "SiLU·mul backward": model.memory(3 * 2 * mh, 2 * 2 * mh),
        "RoPE backward on g_q, g_k": model.memory(2 * 2 * md, 2 * 2 * md),
        # Reads x (fp32) and the bf16 input gradient, adds into the fp32 residual gradient.
        "RMSNorm backward + residual (2)": 2 * model.memory((4 + 2 + 4) * md, 4 * md),
    }


def block_estimate(profiles: list[Profile], recipe: str, gpu: Gpu = Gpu(), tokens: int = TOKENS) -> dict[str, Any]:
    """Forward + backward of one 800M block under ``recipe`` (:data:`RECIPES`): ``parts`` maps each part (the
    groups of :data:`GROUPS`, ``attention``, ``elementwise``) to its passes ``{name: µs}``; ``part_us`` the sum of
    each part; ``block_us`` the sum of all; ``efficiency`` the GEMMs' share of peak."""
    if recipe not in RECIPES:
        raise ValueError(f"block_estimate: recipe={recipe!r} is not allowed; allowed: {', '.join(RECIPES)}")
    model = _Model(profiles, gpu, tokens)
    parts = {name: _projections(model, recipe, k, outs) for name, k, outs in GROUPS}
    parts |= {"attention": _attention(model), "elementwise": _elementwise(model)}
    part_us = {name: sum(passes.values()) for name, passes in parts.items()}
    return {"recipe": recipe, "efficiency": gpu.matmul_efficiency, "tokens": tokens, "parts": parts,
            "part_us": part_us, "block_us": sum(part_us.values())}


def estimates(profiles: list[Profile], gpu: Gpu = Gpu()) -> list[dict[str, Any]]:
    """:func:`block_estimate` of every recipe at every efficiency of :data:`EFFICIENCIES`, each with ``ratio``: its
    block time over bf16's at the same efficiency."""
    out = []
    for efficiency in EFFICIENCIES:
        at = Gpu(**{**asdict(gpu), "matmul_efficiency": efficiency})
        blocks = [block_estimate(profiles, recipe, at) for recipe in RECIPES]
        out += [{**block, "ratio": block["block_us"] / blocks[0]["block_us"]} for block in blocks]
    return out


def assumptions(gpu: Gpu = Gpu()) -> dict[str, str]:
    """What the estimate assumes, each with where it comes from (docs/kernels.md §2-§3), computed from ``gpu``."""
    issue_rate = gpu.sms * 4 * 32 * gpu.clock
    sequences = TOKENS // SEQ_LEN
    return {
        "gpu": f"{gpu.name}: {gpu.sms} SMs at {gpu.clock / 1e9:.2f} GHz, the clock NVIDIA quotes its tensor-core "
               "rates at (NVIDIA H100 Tensor Core GPU datasheet and architecture whitepaper)",
        "tensor_cores": f"dense tensor-core operations per SM per clock: bf16 {MMA_RATE[90]['bf16']}, fp8 "
                        f"{MMA_RATE[90]['fp8']} (NVIDIA's figures): peaks of {gpu.peak('bf16') / 1e12:.0f} TFLOP/s "
                        f"bf16 and {gpu.peak('fp8') / 1e12:.0f} TFLOP/s fp8 (the datasheet's dense figures)",
        "matmul_efficiency": f"every GEMM (cuBLAS bf16, torch._scaled_mm fp8) reaches one share of its dense peak, "
                             f"a parameter: rows at {', '.join(f'{e:.0%}' for e in EFFICIENCIES)}; assumed, not "
                             "measured (the block benchmark of tools/gpu-check.sh measures it)",
        "bandwidth": f"memory passes move {gpu.bytes_per_s / 1e12:.2f} TB/s read + write: "
                     f"{gpu.achieved_bandwidth:.0%} (assumed) of the {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s HBM3 "
                     "bandwidth of NVIDIA's H100 SXM5 datasheet; or the issue rate "
                     f"({gpu.sms} SMs × 4 schedulers × 32 threads × clock = {issue_rate:.3g} thread-instructions/s) "
                     "with the compiled profile's instructions per byte where that is slower",
        "attention": f"causal attention, {sequences} × {SEQ_LEN} tokens, {N_HEAD} heads of {D_MODEL // N_HEAD}, "
                     "FLOPs in FlashAttention's convention (forward 4·B·H·S²·D/2, backward 2.5× forward) at "
                     "FlashAttention-3's measured H100 SXM5 rates at head dim 128, sequence 512 (Shah et al. 2024, "
                     f"arXiv:2407.08608): forward {gpu.attention_forward_flops / 1e12:.0f} TFLOP/s (Fig. 5, causal); "
                     f"backward {gpu.attention_backward_flops / 1e12:.0f} TFLOP/s, the paper's non-causal "
                     f"{gpu.attention_backward_noncausal_flops / 1e12:.0f} (Fig. 6) scaled by the forward's causal / "
                     f"non-causal {gpu.attention_forward_flops / 1e12:.0f}/"
                     f"{gpu.attention_forward_noncausal_flops / 1e12:.0f} (assumed: no causal backward figure); the "
                     "same for every recipe and efficiency",
        "elementwise": "RMSNorms (with autocast's cast to bf16), RoPE, SiLU·mul, residual adds and their backward "
                       "are each one fused pass (read inputs once, write outputs once: what torch.compile makes; "
                       "eager runs more kernels); residual stream fp32, activations bf16; the same for every recipe",
        "bf16": "nn.Linear under bf16 autocast: per projection the fp32 → bf16 weight cast, three bf16 GEMMs, the "
                "bf16 → fp32 weight-gradient cast; the gradients of the shared inputs of q/k/v and gate/up summed",
        "quest_w4a4": "one quantization per shared input (q/k/v and gate/up each one GEMM against the weights' "
                      "codes concatenated); the quantizer reads rows once where K/128 is a power of two up to 32 "
                      "(K = 2048), twice otherwise (down's K = 5632, the second read charged to HBM), and writes "
                      "e4m3 codes, packed int4, mask and step; weights quantized from the fp32 master each step; "
                      "the forward GEMM fp8; backward: dequantize ŵ and x̂, two bf16 GEMMs, mask + IHT of g_x "
                      "(bf16) and g_w (fp32)",
        "quest_w4a4_g8g8": "the quantized backward with fp8 e4m3 gradients and row-wise scales (one per token for "
                           "grad_input, one per output channel for grad_weight): an amax read of g_y, one pass "
                           "writing both fp8 operands (g_y and its transpose), the transposed e4m3 codes of W and X, "
                           "two fp8 GEMMs, mask + IHT of g_x and g_w",
        "groups": "the split output of a shared-input group costs one pass joining its gradients (read + write "
                  "[M, N] bf16) in both quantized recipes",
        "block": f"one 800M block (d_model {D_MODEL}, {N_HEAD} heads, MLP {HIDDEN}) at M = {TOKENS:,} tokens, "
                 "forward + backward; its ratio is its time over bf16's at the same GEMM efficiency",
    }
