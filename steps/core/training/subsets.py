"""Seeded low-data subsets, weighted means over batches and the nRMSE metric."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["low_data_indices", "nrmse", "weighted_mean"]


def low_data_indices(
    labels_or_size: int | np.ndarray | torch.Tensor, fraction: float, *, seed: int
) -> np.ndarray:
    """Sorted indices of a seeded low-data subset holding ``fraction`` of the samples.

    Given class labels the subset is stratified: each class gets its share of
    round(fraction * n) by largest remainder (ties to the lower class); given a size n
    (regression), a uniform random subset. At least one sample is kept.
    """
    if not 0.0 < fraction <= 1.0:  # NaN fails too
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    rng = np.random.default_rng(seed)
    if isinstance(labels_or_size, int | np.integer):
        size = labels_or_size
        chosen = rng.permutation(size)[: _subset_size(size, fraction)]
        return np.sort(chosen).astype(np.int64)
    labels = np.asarray(labels_or_size)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    take = np.floor(quotas).astype(np.int64)
    missing = _subset_size(len(labels), fraction) - int(take.sum())
    take[np.argsort(-(quotas - take), kind="stable")[:missing]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == cls))[:k]
        for cls, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _subset_size(n: int, fraction: float) -> int:
    if n < 1:
        raise ValueError(f"cannot take a subset of {n} samples")
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def nrmse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample normalised RMSE, ||prediction - target||_2 / ||target||_2 (PDEBench's)."""
    diff = (prediction - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1)


def weighted_mean(values: list[tuple[float, int]]) -> float:
    """Mean of (value, count) pairs weighted by count (NaN when there are none)."""
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else float("nan")
