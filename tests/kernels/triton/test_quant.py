"""The fused Triton quantizer against its reference twin ``kernels.quantizers.quantize`` on fresh random inputs.

Runs under ``TRITON_INTERPRET=1`` on CPU (set by tests/conftest.py) or on CUDA when present. Kernel and reference
compute the rotation and the row norm in different summation orders (~1e-7 relative), so a value lying within
1e-6 (relative) of a rounding or mask boundary may land on the other side: such values are counted, and only
they may differ.
"""

from __future__ import annotations

import pytest
import torch

from bitlaw.kernels.packing import field_bits, pack_codes
from bitlaw.kernels.quantizers import quantize, rotate, unrotate
from bitlaw.kernels.recipe import TensorSpec
from bitlaw.kernels.triton import quant as triton_quant
from bitlaw.kernels.triton.quant import dequantize_rows, masked_fraction, quantize_rows

DEVICE = "cpu" if triton_quant.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not (triton_quant.INTERPRETED or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def near_boundary(x: torch.Tensor, spec: TensorSpec, rel: float = 1e-6) -> torch.Tensor:
    """Bool ``[M, K]``: where the reference's ``x_h/step`` is within ``rel`` (relative) of an integer (a rounding
    boundary of the floor) or ``|x_h|`` within ``rel`` of the mask threshold."""
    ref = quantize(x, spec)
    x_h = rotate(x, spec)
    t = x_h / ref.step
    # An exact zero sits on a boundary but floors to 0 in both: it cannot differ.
    near_round = ((t - t.round()).abs() <= rel * t.abs().clamp_min(1.0)) & (x_h != 0)
    threshold = spec.mask_threshold * spec.fmt.max_level * ref.scale
    near_mask = (x_h.abs() - threshold).abs() <= rel * threshold
    return near_round | near_mask


def boundary_free(shape: tuple[int, ...], specs: list[TensorSpec], seed: int, scale: float = 1.0,
                  rel: float = 1e-5) -> torch.Tensor:
    """A fresh N(0, scale²) tensor (fp32, CPU) with no element near a boundary of any of ``specs``: on such inputs
    kernel and reference must agree exactly on codes and masks."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x = torch.randn(shape, generator=gen) * scale
        rows = x.reshape(-1, shape[-1])
        if not any(near_boundary(rows, s, rel).any() for s in specs if s.quantized):
            return x
    raise AssertionError(f"no boundary-free draw of shape {shape} in 200 tries")


def assert_matches_reference(x: torch.Tensor, spec: TensorSpec, pack: bool) -> None:
    """Codes, steps and masks of the kernel equal the reference; only near-boundary values may differ."""
    ref = quantize(x.cpu(), spec)
    got = quantize_rows(x, spec, pack=pack)
    assert got.codes.dtype == (torch.uint8 if pack else torch.int8)
    assert got.field_bits == (field_bits(2**spec.fmt.bits) if pack else 0)
    torch.testing.assert_close(got.step.cpu(), ref.step[:, 0], rtol=1e-6, atol=0)
    codes = got.unpacked_codes().cpu().to(torch.int16)
    mask = got.unpacked_mask().cpu()
    differ = (codes != ref.codes) | (mask != ref.mask)
    near = near_boundary(x.cpu().float(), spec)
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} values away from any boundary differ"
    # Near-boundary values are rare (~1e-6 relative band): a large count would mean a systematic offset.
    assert int(near.sum()) <= max(2, x.numel() // 1000), int(near.sum())
    # Codes are odd integers in [−(2^b − 1), 2^b − 1].
    assert bool((codes % 2 != 0).all()) and int(codes.abs().max()) <= 2**spec.fmt.bits - 1


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize(("m", "k"), [(1, 128), (37, 256), (64, 128)])
def test_codes_steps_masks_equal_the_reference(bits, m, k):
    spec = TensorSpec(format=f"int{bits}", grad="clip" if bits == 1 else "trust")
    gen = torch.Generator().manual_seed(1000 * bits + m + k)
    x = (torch.randn(m, k, generator=gen) * 0.7 + 0.1).to(DEVICE)
    assert_matches_reference(x, spec, pack=bits % 2 == 0)
    assert_matches_reference(x, spec, pack=bits % 2 == 1)


@pytest.mark.parametrize("spec", [TensorSpec(format="int4", grad="ste"), TensorSpec(format="int1", grad="trust"),
                                  TensorSpec(format="int2", grad="clip", clip=1.1),
                                  TensorSpec(format="int4", rotation="none"),
                                  TensorSpec(format="int1", grad="clip", rotation="none")],
                         ids=["ste", "int1-trust", "int2-clip", "int4-noht", "int1-noht-clip"])
def test_gradient_rules_and_no_rotation_equal_the_reference(spec):
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    assert_matches_reference(x, spec, pack=True)


def test_unrotated_any_k_and_bf16_input_and_zero_rows():
    gen = torch.Generator().manual_seed(3)
    # Without rotation K need not be a multiple of 128 (nor of 8: the packed tails are padded).
    assert_matches_reference(torch.randn(19, 203, generator=gen).to(DEVICE), TensorSpec(format="int3",
                                                                                        rotation="none"), pack=True)
    x = torch.randn(37, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    assert_matches_reference(x, TensorSpec(format="int4"), pack=True)
    x = torch.randn(5, 128, generator=gen)
    x[2] = 0.0  # an all-zero row: the reference floors the scale at the smallest normal float
    assert_matches_reference(x.to(DEVICE), TensorSpec(format="int4"), pack=True)


def test_non_contiguous_inputs_are_handled():
    spec = TensorSpec(format="int4")
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(37, 384, generator=gen).to(DEVICE)
    rows = wide[:, 64:320]  # row stride 384: read in place
    transposed = torch.randn(256, 37, generator=gen).to(DEVICE).t()  # strided last dimension: copied
    for x in (rows, transposed):
        assert not x.is_contiguous()
        got, want = quantize_rows(x, spec, pack=True), quantize_rows(x.contiguous(), spec, pack=True)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.step, want.step)
        assert torch.equal(got.mask, want.mask)


@pytest.mark.parametrize(("x", "spec", "match"), [
    (torch.randn(4, 200), TensorSpec(format="int4"), "K=200 is not a multiple of the Hadamard block 128"),
    (torch.randn(4, 128), TensorSpec(format="int8"), "do not fit int8"),
    (torch.randn(4, 128), TensorSpec(format="fp4_e2m1"), "not an integer format"),
    (torch.randn(4, 128), TensorSpec(format="ternary"), "not an integer format"),
    (torch.randn(4, 128), TensorSpec(format="int4", scale="absmax"), "scale 'absmax'"),
    (torch.randn(4, 128), TensorSpec(format="int4", scale="lsq"), "scale 'lsq'"),
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
    monkeypatch.setattr(triton_quant, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        quantize_rows(torch.randn(4, 128), TensorSpec(format="int4"))


def test_dequantize_and_masked_fraction_match_the_reference():
    for spec in (TensorSpec(format="int4"), TensorSpec(format="int2", rotation="none")):
        x = boundary_free((37, 256), [spec], seed=5)
        ref = quantize(x, spec)
        got = quantize_rows(x.to(DEVICE), spec, pack=True)
        torch.testing.assert_close(dequantize_rows(got, unrotate=False).cpu(), ref.values, rtol=1e-6, atol=0)
        torch.testing.assert_close(dequantize_rows(got).cpu(), unrotate(ref.values, spec), rtol=1e-5, atol=1e-6)
        assert float(masked_fraction(got.mask, got.k)) == pytest.approx(float(1 - ref.mask.float().mean()), abs=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_kernel_packs_codes_in_the_storage_encoding(bits):
    gen = torch.Generator().manual_seed(bits)
    spec = TensorSpec(format=f"int{bits}")
    x = torch.randn(9, 256, generator=gen).to(DEVICE)
    got = quantize_rows(x, spec, pack=True)
    assert got.packed and got.field_bits == field_bits(2**bits) and got.codes.dtype == torch.uint8
    assert torch.equal(got.codes.cpu(), pack_codes(quantize_rows(x, spec).codes.cpu(), bits))
