"""GPTQ / SparseGPT on one layer (bitlaw.compress.obs, docs/compress.md §2): the accumulated OBS loss is the
quadratic output loss, the masks have the asked counts, quantized weights lie on bitlaw's grids, the rotated sweep
matches the plain one on the rotated problem, and the sweep beats rounding and magnitude pruning."""

from __future__ import annotations

import pytest
import torch

from bitlaw.compress.obs import HessianAccumulator, compress_layer, damped, rotate_hessian
from bitlaw.kernels.hadamard import block_hadamard
from bitlaw.kernels.quantizers import dequantize, round_to_grid, row_scale
from bitlaw.kernels.recipe import TensorSpec
from bitlaw.kernels.sparsity import kept_count, magnitude_keep

IN, OUT, ROWS = 64, 24, 512
INT3 = TensorSpec(format="int3", rotation="none")


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X [ROWS, IN] float64 with correlated columns, H = 2XᵀX/N, W [OUT, IN] fp32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, IN, generator=gen, dtype=torch.float64)
    x = x @ (torch.eye(IN, dtype=torch.float64) + 0.5 * torch.randn(IN, IN, generator=gen, dtype=torch.float64))
    return x, 2 * x.T @ x / ROWS, torch.randn(OUT, IN, generator=gen)


def output_loss(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖(W − Ŵ)·Xᵀ‖² / N: the layer-output loss that ½ δ H δᵀ equals for H = 2XᵀX/N."""
    return float(((w.double() - w_hat.double()) @ x.T).square().sum() / x.shape[0])


def quadratic(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    delta = w_hat.double() - w.double()
    return float(0.5 * (delta @ h * delta).sum())


def test_hessian_accumulator_is_the_running_mean_whatever_the_batching(problem):
    x, h, _ = problem
    acc = HessianAccumulator(IN)
    for part in (x[:1], x[1:197].reshape(7, -1, IN), x[197:]):
        acc.add(part.float())
    assert acc.rows == ROWS
    torch.testing.assert_close(acc.hessian, 2 * x.float().double().T @ x.float().double() / ROWS)
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        acc.add(torch.zeros(3, IN + 1))


@pytest.mark.parametrize("kwargs", [
    {"sparsity": 0.5}, {"nm": (2, 4)}, {"spec": INT3}, {"spec": INT3, "sparsity": 0.3},
    {"spec": INT3, "act_order": True},
], ids=["sparse", "2:4", "int3", "int3+sparse", "int3+act_order"])
@pytest.mark.parametrize("block_size", [IN, 16])
def test_accumulated_loss_is_the_output_loss(problem, kwargs, block_size):
    # Without dampening the exact identity Σ err²/(2 U_jj²) = ½ δ H δᵀ = ‖δ Xᵀ‖²/N holds for any block size.
    x, h, w = problem
    result = compress_layer(w, h, damp=0.0, block_size=block_size, **kwargs)
    assert result.loss == pytest.approx(output_loss(x, w, result.weight), rel=1e-5)


def test_with_dampening_the_loss_is_the_damped_quadratic(problem):
    _, h, w = problem
    result = compress_layer(w, h, spec=INT3, sparsity=0.25, damp=0.1, block_size=16)
    assert result.loss == pytest.approx(quadratic(w, result.weight, damped(h, 0.1)[0]), rel=1e-5)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_every_row_prunes_exactly_the_rounded_count(problem, sparsity):
    _, h, w = problem
    result = compress_layer(w, h, sparsity=sparsity, block_size=20)
    pruned = IN - kept_count(IN, sparsity)
    assert (result.mask.sum(dim=1) == IN - pruned).all()
    assert (result.weight[~result.mask] == 0).all()
    assert result.sparsity == pytest.approx(pruned / IN) and result.sparsity >= sparsity - 0.5 / IN


def test_n_m_keeps_exactly_n_of_every_m(problem):
    _, h, w = problem
    result = compress_layer(w, h, nm=(2, 4), block_size=30)  # not a multiple of 4: rounded down to 28
    assert (result.mask.reshape(OUT, IN // 4, 4).sum(dim=-1) == 2).all()
    assert (result.weight[~result.mask] == 0).all() and result.sparsity == 0.5


def test_rank_deficient_inputs_are_positive_definite_after_dampening():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, IN, generator=gen, dtype=torch.float64)  # 16 rows: rank 16 of 64
    x[:, 5] = 0.0  # a dead input
    h = 2 * x.T @ x / 16
    assert bool(torch.linalg.cholesky_ex(damped(h, 0.01)[0]).info == 0)
    w = torch.randn(OUT, IN, generator=gen)
    result = compress_layer(w, h, spec=INT3)
    assert torch.isfinite(result.weight).all()
    with pytest.raises(ValueError, match="in_features=64, out_features=24.*larger damp"):
        compress_layer(w, h, damp=0.0)


def test_dead_inputs_get_a_zero_weight_column(problem):
    x, _, w = problem
    x = x.clone()
    x[:, 3] = 0.0
    result = compress_layer(w, 2 * x.T @ x / ROWS, sparsity=0.5)
    assert (result.weight[:, 3] == 0).all()


@pytest.mark.parametrize("fmt", ["int3", "int4z", "fp4_e2m1", "ternary"])
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_quantized_rows_are_on_the_grid(problem, fmt, rotation):
    _, h, w = problem
    spec = TensorSpec(format=fmt, rotation=rotation, block=16)
    result = compress_layer(w, h, spec=spec, sparsity=0.25)
    scale = result.step if result.step is not None else result.scale
    values = dequantize(result.codes, scale, spec.fmt)
    assert torch.equal(torch.where(result.mask, values, 0.0), result.stored)
    torch.testing.assert_close(block_hadamard(result.weight, 16) if spec.rotated else result.weight, result.stored)
    # Every kept value is a level of the unit grid times its row's scale.
    levels = torch.tensor(spec.fmt.levels)
    unit = result.stored / result.scale
    assert (unit[result.mask][:, None] - levels).abs().amin(dim=1).max() < 1e-5
    assert (result.stored[~result.mask] == 0).all()


def test_gptq_beats_round_to_nearest(problem):
    x, h, w = problem
    rounded = round_to_grid(w, row_scale(w, INT3), INT3.fmt)[0]
    assert output_loss(x, w, compress_layer(w, h, spec=INT3).weight) < 0.8 * output_loss(x, w, rounded)


def test_sparsegpt_beats_magnitude_pruning(problem):
    x, h, w = problem
    magnitude = torch.where(magnitude_keep(w, "row", 0.5), w, 0.0)
    assert output_loss(x, w, compress_layer(w, h, sparsity=0.5, block_size=16).weight) < 0.8 * output_loss(
        x, w, magnitude)


def test_act_order_is_valid_and_in_the_original_order(problem):
    x, h, w = problem
    result = compress_layer(w, h, spec=INT3, sparsity=0.5, act_order=True, block_size=16)
    assert (result.mask.sum(dim=1) == IN // 2).all()
    assert torch.equal(result.stored, round_to_grid(result.stored, result.scale, INT3.fmt)[0] * result.mask)
    magnitude = torch.where(magnitude_keep(w, "row", 0.5), w, 0.0)
    assert output_loss(x, w, result.weight) < output_loss(x, w, magnitude)


def test_the_rotated_sweep_is_the_plain_sweep_of_the_rotated_problem(problem):
    x, h, w = problem
    spec = TensorSpec(format="int3", block=32)
    result = compress_layer(w, h, spec=spec, sparsity=0.25, damp=0.0, block_size=16)
    plain = compress_layer(block_hadamard(w, 32), rotate_hessian(h, spec), spec=TensorSpec(
        format="int3", rotation="none"), sparsity=0.25, damp=0.0, block_size=16)
    torch.testing.assert_close(rotate_hessian(h, spec), 2 * block_hadamard(x, 32).T @ block_hadamard(x, 32) / ROWS)
    assert torch.equal(result.mask, plain.mask) and torch.equal(result.codes, plain.codes)
    # The loss measured on the layer's own output, with the unrotated weight and the unrotated inputs.
    assert result.loss == pytest.approx(output_loss(x, w, result.weight), rel=1e-5)
    assert result.loss == pytest.approx(plain.loss, rel=1e-6)  # plain got W·Had in fp32


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sparsity": 1.0}, r"sparsity=1\.0 .*\[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity=-0\.1"),
    ({"nm": (4, 4)}, r"nm=\(4, 4\).*1 <= N < M"),
    ({"nm": (1, 5)}, r"nm=\(1, 5\).*M dividing in_features"),
    ({"nm": (2, 4), "sparsity": 0.5}, "one of the two"),
    ({"nm": (2, 4), "act_order": True}, "act_order"),
    ({"damp": -1.0}, "damp=-1.0"),
    ({"block_size": 0}, "block_size=0"),
    ({"spec": TensorSpec(format="int4", scale="lsq")}, "scale='lsq'"),
    ({"spec": TensorSpec(format="int4", group=16)}, "group=16"),
    ({"spec": TensorSpec(format="int4", block=128)}, "block=128 does not divide in_features=64"),
])
def test_bad_arguments_name_the_field(problem, kwargs, match):
    _, h, w = problem
    with pytest.raises(ValueError, match=match):
        compress_layer(w, h, **kwargs)


def test_bad_shapes_and_values_are_refused(problem):
    _, h, w = problem
    with pytest.raises(ValueError, match=r"hessian of shape \(63, 63\).*allowed: \[64, 64\]"):
        compress_layer(w, h[:63, :63])
    with pytest.raises(ValueError, match="hessian has non-finite"):
        compress_layer(w, torch.full_like(h, float("nan")))
    with pytest.raises(ValueError, match=r"weight of shape \(64,\)"):
        compress_layer(w[0], h)


def test_a_sparse_spec_supplies_the_sparsity(problem):
    _, h, w = problem
    result = compress_layer(w, h, spec=TensorSpec(format="int4", rotation="none", structure="2:4"))
    assert (result.mask.reshape(OUT, -1, 4).sum(dim=-1) == 2).all()
