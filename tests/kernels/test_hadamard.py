"""Block Hadamard transform: equals scipy's Hadamard, orthonormal, exact inverse, clear errors."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from bitlaw.kernels.hadamard import block_hadamard, hadamard_matrix, inverse_block_hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_matches_scipy(n):
    expected = scipy.linalg.hadamard(n) / math.sqrt(n)
    got = hadamard_matrix(n, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


def test_orthonormal_symmetric_fp32():
    h = hadamard_matrix(128)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(128), rtol=0, atol=1e-6)


def test_block_transform_equals_blockdiag_matmul():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 512, generator=gen, dtype=torch.float64)
    h = scipy.linalg.hadamard(128) / math.sqrt(128)
    blockdiag = torch.from_numpy(scipy.linalg.block_diag(*([h] * 4)))
    torch.testing.assert_close(block_hadamard(x, 128), x @ blockdiag, rtol=0, atol=1e-12)
    torch.testing.assert_close(block_hadamard(x, 32), x @ torch.from_numpy(
        scipy.linalg.block_diag(*([scipy.linalg.hadamard(32) / math.sqrt(32)] * 16))), rtol=0, atol=1e-12)


def test_inverse_round_trip_and_norm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=gen, dtype=torch.float64)
    x_h = block_hadamard(x)
    torch.testing.assert_close(inverse_block_hadamard(x_h), x, rtol=0, atol=1e-13)
    # An orthonormal rotation keeps every row's norm: the RMS scale can be computed before or after it.
    torch.testing.assert_close(x_h.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)


def test_low_precision_input_is_rotated_in_fp32():
    x = torch.randn(4, 128).to(torch.bfloat16)
    out = block_hadamard(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ hadamard_matrix(128), rtol=0, atol=1e-6)


def test_rotation_stays_fp32_under_bf16_autocast():
    x = torch.randn(4, 256)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = block_hadamard(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(inverse_block_hadamard(out), x, rtol=0, atol=1e-5)


def test_gradcheck():
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block_hadamard(t, 16), (x,))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="block=128 does not divide the last dimension 200"):
        block_hadamard(torch.randn(2, 200))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
