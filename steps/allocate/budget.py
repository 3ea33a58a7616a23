"""Fit per-layer values to a parameter-weighted global budget, with clipping.

Values are v_i(x) = clip(a_i * x + b_i, low, high) for one free scalar x: a scale
(a = raw, b = 0; AlphaPruning) or a shift (a = 1, b = raw; OWL). The weighted sum
g(x) = sum_i P_i v_i(x) is piecewise linear and non-decreasing in x, so the x that
meets the budget is found exactly from the breakpoints. This is the fixed point of
"clip, then redistribute the excess among the unclipped layers" (in proportion for
a scale, evenly for a shift), reached without iterating.
"""

from typing import Literal

import numpy as np


def fit_budget(
    raw: np.ndarray,
    weights: np.ndarray,
    target: float,
    *,
    low: float,
    high: float,
    how: Literal["scale", "shift"],
) -> tuple[np.ndarray, np.ndarray]:
    """Return (values, clipped) with sum(weights * values) / sum(weights) == target.

    `clipped` marks the layers whose unclipped value lies outside [low, high].
    Needs low <= target <= high and, for a scale, raw > 0.
    """
    if not low <= target <= high:
        raise ValueError(f"target {target} outside [{low}, {high}]")
    slope, offset = (raw, np.zeros_like(raw)) if how == "scale" else (np.ones_like(raw), raw)
    if (slope <= 0).any():
        raise ValueError("scaled values must be positive")
    total = target * weights.sum()

    def weighted_sum(x: float) -> float:
        return float(weights @ np.clip(slope * x + offset, low, high))

    # Between consecutive breakpoints the set of clipped layers is fixed.
    breaks = np.unique(np.concatenate([(low - offset) / slope, (high - offset) / slope]))
    sums = np.array([weighted_sum(x) for x in breaks])
    k = int(np.searchsorted(sums, total))  # sums[k - 1] < total <= sums[k]
    if k == 0:
        x = breaks[0]
    elif k == len(breaks):
        x = breaks[-1]
    else:
        x = _solve_segment(slope, offset, weights, total, low, high, breaks[k - 1], breaks[k])
    line = slope * x + offset
    return np.clip(line, low, high), (line < low) | (line > high)


def _solve_segment(
    slope: np.ndarray,
    offset: np.ndarray,
    weights: np.ndarray,
    total: float,
    low: float,
    high: float,
    left: float,
    right: float,
) -> float:
    """Solve g(x) = total on [left, right], where g is linear."""
    mid = np.clip(slope * (left + right) / 2 + offset, low, high)
    free = (mid > low) & (mid < high)
    fixed = float(weights[~free] @ mid[~free])
    rate = float(weights[free] @ slope[free])
    if rate == 0:
        return right
    x = (total - fixed - float(weights[free] @ offset[free])) / rate
    return float(np.clip(x, left, right))
