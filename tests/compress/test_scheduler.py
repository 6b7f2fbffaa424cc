"""The layer-wise sparsity allocations (bitlaw.compress.scheduler, docs/compress.md §3): Zhang et al.'s
loss-clustering scheduler, OWL and uniform keep the parameter-weighted mean sparsity at the target."""

from __future__ import annotations

import pytest
import torch

from bitlaw.compress.obs import compress_layer
from bitlaw.compress.scheduler import (
    kmeans_1d,
    layer_pruning_loss,
    outlier_ratio,
    owl,
    schedule,
    uniform,
    weighted_mean,
)

SIZES = {"q": 4096, "k": 1024, "v": 1024, "o": 4096, "up": 11008, "down": 11008}
LOSSES = {"q": 3.0, "k": 0.2, "v": 40.0, "o": 9.0, "up": 120.0, "down": 0.01}


def test_kmeans_recovers_well_separated_groups():
    values = [0.1, 10.2, 5.0, 0.0, 9.9, 5.2, 0.2, 10.0, 4.9]
    assert kmeans_1d(values, 3) == [0, 2, 1, 0, 2, 1, 0, 2, 1]
    assert kmeans_1d(values, 1) == [0] * 9
    assert kmeans_1d([1.0, 1.0, 1.0], 3) == [0, 0, 0]  # empty clusters dropped, labels stay compact
    with pytest.raises(ValueError, match=r"k=4 .*\[1, 3\]"):
        kmeans_1d([1.0, 2.0, 3.0], 4)


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("clusters", [1, 2, 3, 6])
def test_schedule_hits_the_target_and_is_monotone_in_the_loss(target, clusters):
    result = schedule(LOSSES, SIZES, target, clusters=clusters, spread=0.1)
    assert weighted_mean(result, SIZES) == pytest.approx(target, abs=1e-6)
    assert all(0.0 <= s <= 0.95 for s in result.values())
    by_loss = sorted(SIZES, key=LOSSES.get)
    assert all(result[a] >= result[b] for a, b in zip(by_loss, by_loss[1:], strict=False))


def test_schedule_spreads_the_clusters_linearly():
    losses = {"a": 1e-3, "b": 1.1e-3, "c": 1.0, "d": 1.1, "e": 1e3, "f": 1.1e3}
    sizes = dict.fromkeys(losses, 100)
    result = schedule(losses, sizes, 0.5, clusters=3, spread=0.1)
    assert result["a"] == result["b"] == pytest.approx(0.6)
    assert result["c"] == result["d"] == pytest.approx(0.5)
    assert result["e"] == result["f"] == pytest.approx(0.4)


def test_schedule_refuses_unreachable_targets_and_bad_input():
    with pytest.raises(ValueError, match=r"target=0\.96 cannot be reached.*max_sparsity=0\.95"):
        schedule(LOSSES, SIZES, 0.96)
    with pytest.raises(ValueError, match="only in sizes"):
        schedule({"q": 1.0}, SIZES, 0.5)
    with pytest.raises(ValueError, match="losses .*'v': -1.0"):
        schedule({**LOSSES, "v": -1.0}, SIZES, 0.5)
    with pytest.raises(ValueError, match="sizes .*'q': 0"):
        schedule(LOSSES, {**SIZES, "q": 0}, 0.5)
    with pytest.raises(ValueError, match="clusters=0"):
        schedule(LOSSES, SIZES, 0.5, clusters=0)


def test_uniform_and_owl_keep_the_weighted_mean():
    assert uniform(SIZES, 0.6) == dict.fromkeys(SIZES, 0.6)
    ratios = {"q": 0.01, "k": 0.03, "v": 0.002, "o": 0.02, "up": 0.005, "down": 0.04}
    result = owl(ratios, SIZES, 0.7, lam=0.08)
    assert weighted_mean(result, SIZES) == pytest.approx(0.7, abs=1e-12)
    assert result["down"] < result["v"] and max(result.values()) - min(result.values()) == pytest.approx(0.16)
    with pytest.raises(ValueError, match="outside"):
        owl(ratios, SIZES, 0.02, lam=0.08)
    with pytest.raises(ValueError, match="target=1.0"):
        uniform(SIZES, 1.0)


def test_layer_pruning_loss_estimates_the_sweep():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen, dtype=torch.float64)
    h = 2 * x.T @ x / 256
    w = torch.randn(16, 32, generator=gen)
    assert layer_pruning_loss(w, h, 0.0) == 0.0
    losses = [layer_pruning_loss(w, h, s) for s in (0.25, 0.5, 0.75)]
    assert losses == sorted(losses)
    # The estimate sums independent single-entry costs; the sweep's exact loss of pruning as much stays within a
    # small factor of it (the estimate ranks layers, it is not the sweep's loss).
    actual = compress_layer(w, h, sparsity=0.5, damp=0.01).loss
    assert 0.3 * losses[1] < actual < 3 * losses[1]
    assert layer_pruning_loss(2 * w, h, 0.5) == pytest.approx(4 * losses[1])


def test_outlier_ratio_counts_large_scores():
    w = torch.ones(4, 8)
    h = torch.eye(8, dtype=torch.float64)
    assert outlier_ratio(w, h) == 0.0
    w[0, 0] = 100.0
    assert outlier_ratio(w, h, threshold=5.0) == pytest.approx(1 / 32)
