"""The fused Triton quantizer against its reference twin ``kernels.quantizers.quantize`` on fresh random inputs.

Runs under ``TRITON_INTERPRET=1`` on CPU (set by tests/conftest.py) or on CUDA when present. Kernel and reference
compute the rotation and the row norm in different summation orders, and the kernel multiplies by a per-row
reciprocal where the reference divides, so a value lying within the float error of those sums of a rounding or
mask boundary may land on the other side: :func:`near_boundary` bounds that error (docs/numerics.md §6) and only
such values may differ.
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.packing import field_bits, pack_codes, unpack_codes
from bitlaw.kernels.quantizers import quantize, rotate, unrotate
from bitlaw.kernels.recipe import TensorSpec
from bitlaw.kernels.triton import quant
from bitlaw.kernels.triton.backward import dequantize_rows
from bitlaw.kernels.triton.common import HADAMARD_BLOCK, INTERPRETED
from bitlaw.kernels.triton.quant import (
    code_dtype,
    launch_config,
    masked_fraction,
    one_pass_blocks,
    quantize_row_groups,
    quantize_rows,
)

DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")
FP32_EPS = 2.0**-24  # unit roundoff of fp32


def rounding_band(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """How far ``[M, K]`` the kernel's ``x_h`` may lie from the reference's. Both sum the 128 products of a block in
    fp32 (the GPU's bf16 or 3×TF32 dot with the exact ±1 matrix, numpy's, torch's), in different orders: each of the
    127 additions rounds by at most u times its partial sum, and partial sums of ±x grow like sqrt(i)·RMS, so the
    difference stays within 8·u·‖x_block‖₂ (a few standard deviations of that random walk; the worst case, u·128·Σ|x|,
    is 10× larger and never reached). Plus a few roundings of the scale: 4·u·|x_h|."""
    x = x.float()
    if spec.rotated:
        norm = x.reshape(*x.shape[:-1], -1, HADAMARD_BLOCK).norm(dim=-1, keepdim=True)
        norm = norm.expand(*x.shape[:-1], -1, HADAMARD_BLOCK).reshape(x.shape)
        return 8 * FP32_EPS * norm + 4 * FP32_EPS * rotate(x, spec).abs()
    return 4 * FP32_EPS * x.abs()


def near_boundary(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Bool ``[M, K]``: where the reference's ``x_h`` lies within :func:`rounding_band` of a rounding boundary of the
    floor (``x_h/step`` an integer) or of the mask threshold."""
    ref = quantize(x, spec)
    x_h = rotate(x, spec)
    band = rounding_band(x, spec)
    t = x_h / ref.step
    # An exact zero sits on a boundary but floors to 0 in both: it cannot differ.
    near_round = ((t - t.round()).abs() * ref.step <= band + 4 * FP32_EPS * x_h.abs()) & (x_h != 0)
    threshold = spec.mask_threshold * spec.fmt.max_level * ref.scale
    # grad: ste has no mask boundary (an infinite threshold): no element is near one.
    near_mask = ((x_h.abs() - threshold).abs() <= band + 4 * FP32_EPS * threshold) & threshold.isfinite()
    return near_round | near_mask


def boundary_free(shape: tuple[int, ...], specs: list[TensorSpec], seed: int, scale: float = 1.0) -> torch.Tensor:
    """A fresh N(0, scale²) tensor (fp32, CPU) with no element near a boundary of any of ``specs``: on such inputs
    kernel and reference must agree exactly on codes and masks."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x = torch.randn(shape, generator=gen) * scale
        rows = x.reshape(-1, shape[-1])
        if not any(near_boundary(rows, s).any() for s in specs if s.quantized):
            return x
    raise AssertionError(f"no boundary-free draw of shape {shape} in 200 tries")


def assert_matches_reference(x: torch.Tensor, spec: TensorSpec) -> None:
    """Codes (int8 and packed), steps and masks of the kernel equal the reference; only near-boundary values may
    differ."""
    ref = quantize(x.cpu(), spec)
    got = quantize_rows(x, spec, codes=True, packed=True)
    assert got.codes.dtype == code_dtype(spec.fmt.bits) and got.packed.dtype == torch.uint8
    assert got.packed.shape == (x.shape[0], -(-x.shape[1] * field_bits(2**spec.fmt.bits) // 8))
    torch.testing.assert_close(got.step.cpu(), ref.step[:, 0], rtol=1e-6, atol=0)
    codes = got.unpacked_codes().cpu().to(torch.int16)
    assert torch.equal(unpack_codes(got.packed.cpu(), spec.fmt.bits, x.shape[1]).to(torch.int16), codes)
    mask = got.unpacked_mask().cpu()
    differ = (codes != ref.codes) | (mask != ref.mask)
    near = near_boundary(x.cpu().float(), spec)
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} values away from any boundary differ"
    # Near-boundary values are rare (a band of ~1e-5 of a step): a large count would mean a systematic offset.
    assert int(near.sum()) <= max(2, x.numel() // 200), int(near.sum())
    # Codes are odd integers in [−(2^b − 1), 2^b − 1].
    assert bool((codes % 2 != 0).all()) and int(codes.abs().max()) <= 2**spec.fmt.bits - 1


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize(("m", "k"), [(1, 128), (37, 256), (64, 128), (5, 384)])
def test_codes_steps_masks_equal_the_reference(bits, m, k):
    spec = TensorSpec(format=f"int{bits}", grad="clip" if bits == 1 else "trust")
    gen = torch.Generator().manual_seed(1000 * bits + m + k)
    x = (torch.randn(m, k, generator=gen) * 0.7 + 0.1).to(DEVICE)
    assert_matches_reference(x, spec)


def test_one_pass_is_chosen_for_power_of_two_blocks():
    # Whole power-of-two numbers of 128-column blocks up to 4096 columns are read once (fp32 rows before Hopper
    # excepted); other widths take two passes over the row.
    assert [one_pass_blocks(k, torch.bfloat16, 90) for k in (128, 256, 2048, 4096)] == [1, 2, 16, 32]
    assert [one_pass_blocks(k, torch.bfloat16, 90) for k in (384, 5632, 8192, 200)] == [0, 0, 0, 0]
    assert one_pass_blocks(2048, torch.float32, 90) == 16 and one_pass_blocks(2048, torch.float32, 80) == 0
    assert launch_config(torch.bfloat16, 90, 2048) == (4, 4, 1, 16)  # 4 rows × 16 blocks: 64 tiles per program


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [TensorSpec(format="int4"), TensorSpec(format="int2", rotation="none")])
def test_one_pass_and_two_passes_agree(monkeypatch, dtype, spec):
    # The same rows through both kernels (two passes forced): both equal the reference away from boundaries, and
    # each other up to the order of the sum of squares (steps within an ulp or two).
    x = (torch.randn(19, 1024, generator=torch.Generator().manual_seed(5)) * 0.9).to(dtype).to(DEVICE)
    assert one_pass_blocks(1024, dtype, 90) == 8
    one = quantize_rows(x, spec, codes=True, packed=True)
    assert_matches_reference(x.float(), spec)
    monkeypatch.setattr(quant, "one_pass_blocks", lambda *args: 0)
    two = quantize_rows(x, spec, codes=True, packed=True)
    assert_matches_reference(x.float(), spec)
    torch.testing.assert_close(one.step, two.step, rtol=4 * FP32_EPS, atol=0)
    differ = (one.unpacked_codes() != two.unpacked_codes()) | (one.unpacked_mask() != two.unpacked_mask())
    assert int(differ.sum()) <= max(2, x.numel() // 1000)


@pytest.mark.parametrize("spec", [TensorSpec(format="int4", grad="ste"), TensorSpec(format="int1", grad="trust"),
                                  TensorSpec(format="int2", grad="clip", clip=1.1),
                                  TensorSpec(format="int4", grad="clip", clip=1.0),
                                  TensorSpec(format="int4", rotation="none"),
                                  TensorSpec(format="int1", grad="clip", rotation="none")],
                         ids=["ste", "int1-trust", "int2-clip", "int4-clip1", "int4-noht", "int1-noht-clip"])
def test_gradient_rules_and_no_rotation_equal_the_reference(spec):
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    assert_matches_reference(x, spec)


def test_unrotated_any_k_and_bf16_input_and_zero_rows():
    gen = torch.Generator().manual_seed(3)
    # Without rotation K need not be a multiple of 128 (nor of 8: the packed tails are padded).
    assert_matches_reference(torch.randn(19, 203, generator=gen).to(DEVICE), TensorSpec(format="int3",
                                                                                        rotation="none"))
    x = torch.randn(37, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    assert_matches_reference(x, TensorSpec(format="int4"))
    x = torch.randn(5, 128, generator=gen)
    x[2] = 0.0  # an all-zero row: the reference floors the scale at the smallest normal float
    assert_matches_reference(x.to(DEVICE), TensorSpec(format="int4"))


def test_non_contiguous_inputs_are_handled():
    spec = TensorSpec(format="int4")
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(37, 384, generator=gen).to(DEVICE)
    rows = wide[:, 64:320]  # row stride 384: read in place
    transposed = torch.randn(256, 37, generator=gen).to(DEVICE).t()  # strided last dimension: copied
    for x in (rows, transposed):
        assert not x.is_contiguous()
        got = quantize_rows(x, spec, codes=True, packed=True)
        want = quantize_rows(x.contiguous(), spec, codes=True, packed=True)
        assert torch.equal(got.unpacked_codes(), want.unpacked_codes()) and torch.equal(got.packed, want.packed)
        assert torch.equal(got.step, want.step)
        assert torch.equal(got.mask, want.mask)


@pytest.mark.parametrize(("x", "spec", "match"), [
    (torch.randn(4, 200), TensorSpec(format="int4"), "K=200 is not a multiple of the Hadamard block 128"),
    (torch.randn(4, 128), TensorSpec(format="int8"), "do not fit int8"),
    (torch.randn(4, 128), TensorSpec(format="fp4_e2m1"), "not an integer format"),
    (torch.randn(4, 128), TensorSpec(format="ternary"), "not an integer format"),
    (torch.randn(4, 128), TensorSpec(format="int4", scale="absmax"), "scale 'absmax'"),
    (torch.randn(4, 128), TensorSpec(format="int4", scale="lsq"), "scale 'lsq'"),
    (torch.randn(4, 128), TensorSpec(format="int4", scale="lsq_step"), "scale 'lsq_step'"),
    (torch.randn(4, 128), TensorSpec(format="int4", block=64), "hadamard block 64"),
    (torch.randn(128), TensorSpec(format="int4"), r"expected a 2-D \[rows, K\] tensor, got shape \(128,\)"),
    (torch.randn(2, 2, 128), TensorSpec(format="int4"), "got shape"),
    (torch.randn(4, 128, dtype=torch.float64), TensorSpec(format="int4"), "dtype torch.float64 is not supported"),
    (torch.randn(4, 128).half(), TensorSpec(format="int4"), "allowed: torch.float32, torch.bfloat16"),
])
def test_bad_input_is_rejected_clearly(x, spec, match):
    with pytest.raises(ValueError, match=match):
        quantize_rows(x.to(DEVICE), spec)


def test_cpu_tensors_without_the_interpreter_are_rejected(monkeypatch):
    from bitlaw.kernels.triton import common

    monkeypatch.setattr(common, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        quantize_rows(torch.randn(4, 128), TensorSpec(format="int4"))


def test_dequantize_and_masked_fraction_match_the_reference():
    for spec in (TensorSpec(format="int4"), TensorSpec(format="int2", rotation="none")):
        x = boundary_free((37, 256), [spec], seed=5)
        ref = quantize(x, spec)
        got = quantize_rows(x.to(DEVICE), spec, codes=False, packed=True)
        assert got.codes is None
        torch.testing.assert_close(dequantize_rows(got).cpu(), ref.values, rtol=1e-6, atol=0)
        torch.testing.assert_close(dequantize_rows(got, unrotate=True).cpu(), unrotate(ref.values, spec), rtol=1e-5,
                                   atol=1e-6)
        # bf16 values: the fp32 values rounded once.
        torch.testing.assert_close(dequantize_rows(got, torch.bfloat16).cpu(), ref.values.bfloat16(), rtol=0, atol=0)
        assert float(masked_fraction(got.mask, got.k)) == pytest.approx(float(1 - ref.mask.float().mean()), abs=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_kernel_packs_codes_in_the_storage_encoding(bits):
    gen = torch.Generator().manual_seed(bits)
    spec = TensorSpec(format=f"int{bits}")
    x = torch.randn(9, 256, generator=gen).to(DEVICE)
    got = quantize_rows(x, spec, codes=True, packed=True)
    assert got.field_bits == field_bits(2**bits)
    assert torch.equal(got.packed.cpu(), pack_codes(got.unpacked_codes().cpu(), bits))
    only = quantize_rows(x, spec, codes=False, packed=True)
    assert only.codes is None and torch.equal(only.packed, got.packed) and torch.equal(only.mask, got.mask)
    with pytest.raises(ValueError, match="ask for codes, packed codes or both"):
        quantize_rows(x, spec, codes=False, packed=False)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fp8_codes_are_torchs_e4m3_of_the_odd_codes(bits):
    spec = TensorSpec(format=f"int{bits}")
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(bits)).to(DEVICE)
    got = quantize_rows(x, spec, codes=True, packed=True)
    odd = unpack_codes(got.packed.cpu(), bits, 256)
    assert got.codes.dtype == torch.float8_e4m3fn
    # The kernel writes the bit patterns itself (integer arithmetic); torch's conversion of the same integers.
    assert torch.equal(got.codes.cpu().view(torch.uint8), odd.float().to(torch.float8_e4m3fn).view(torch.uint8))


def test_a_group_of_tensors_equals_their_concatenation():
    spec = TensorSpec(format="int4")
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 256, generator=gen).to(DEVICE) for n in (48, 16, 33)]
    group = quantize_row_groups(parts, spec, codes=True, packed=True)
    whole = quantize_rows(torch.cat(parts), spec, codes=True, packed=True)
    for name in ("packed", "step", "mask"):
        assert torch.equal(getattr(group, name), getattr(whole, name)), name
    assert torch.equal(group.codes.view(torch.uint8), whole.codes.view(torch.uint8))
    with pytest.raises(ValueError, match=r"different row lengths \[256, 128\]"):
        quantize_row_groups([parts[0], parts[1][:, :128]], spec)
