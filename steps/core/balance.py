"""The TempBalance rule: per-layer learning-rate factors from alpha (METHODS.md section 2).

Shared by the allocate step (factors as a decisions table) and the finetune step (factors
recomputed during training), so both apply the same formula.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TempBalanceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["linear", "sigmoid"] = "linear"
    metric: str = Field("alpha", description="metric column (hill alpha in the papers)")
    lr_min: float = Field(0.5, gt=0, description="linear: factor at the lowest alpha")
    lr_max: float = Field(1.5, gt=0, description="linear: factor at the highest alpha")
    scale: float | None = Field(
        None, gt=0, description="sigmoid: one s for both sides (instead of scale_low/high)"
    )
    scale_low: float = Field(
        2.0, gt=0, description="sigmoid: s below the mean alpha (reference sigmoid_min)"
    )
    scale_high: float = Field(
        1.0, gt=0, description="sigmoid: s above the mean alpha (reference sigmoid_max)"
    )
    by_block: bool | None = Field(
        None, description="use block means; default False for linear, True for sigmoid"
    )
    exclude_first_last: bool = Field(True, description="first and last layers keep factor 1.0")
    min_eigs: int = Field(50, ge=0, description="layers with min(N, M) below this keep 1.0")

    @model_validator(mode="after")
    def _check_range(self) -> TempBalanceOptions:
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min {self.lr_min} > lr_max {self.lr_max}")
        if self.scale is not None and self.model_fields_set & {"scale_low", "scale_high"}:
            raise ValueError("give scale, or scale_low / scale_high, not both")
        return self

    @property
    def sigmoid_scales(self) -> tuple[float, float]:
        """(s below the mean alpha, s above it); ``scale`` sets both."""
        if self.scale is not None:
            return self.scale, self.scale
        return self.scale_low, self.scale_high

    @property
    def blockwise(self) -> bool:
        return self.by_block if self.by_block is not None else self.variant == "sigmoid"


def block_means(
    values: np.ndarray, blocks: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Each row's value replaced by the mean over its block (plain mean, as the reference code,
    unless `weights` are given)."""
    weights = np.ones_like(values) if weights is None else weights
    unique, inverse = np.unique(blocks, return_inverse=True)
    sums = np.bincount(inverse, weights=values * weights, minlength=len(unique))
    totals = np.bincount(inverse, weights=weights, minlength=len(unique))
    return (sums / totals)[inverse]


def min_max_unit(values: np.ndarray) -> np.ndarray:
    """Map values linearly onto [0, 1]; all-equal values map to 0.5 (no preference)."""
    low, high = values.min(), values.max()
    if high == low:
        return np.full_like(values, 0.5, dtype=float)
    return (values - low) / (high - low)


def lr_factors(
    alpha: np.ndarray, groups: np.ndarray, included: np.ndarray, options: TempBalanceOptions
) -> tuple[np.ndarray, np.ndarray]:
    """(score, lr factor) per layer from alpha, group ids (blocks, or one per layer) and the
    mask of balanced layers; the others keep their alpha as score and factor 1.0."""
    score = alpha.copy()
    # Excluded layers take no part in their block's mean.
    score[included] = block_means(alpha[included], groups[included])
    factor = np.ones(len(alpha))
    if options.variant == "linear":
        unit = min_max_unit(score[included])
        factor[included] = options.lr_min + unit * (options.lr_max - options.lr_min)
    else:
        factor[included] = _sigmoid_factors(score[included], groups[included],
                                            *options.sigmoid_scales)
    return score, factor


def _sigmoid_factors(score: np.ndarray, groups: np.ndarray, low: float,
                     high: float) -> np.ndarray:
    """10^phi, phi = s * (sigmoid(10 * (alpha_b - mean alpha)) - 0.5); mean over blocks;
    s = ``high`` above the mean, ``low`` at or below it (the TB_Sigmoid reference's
    sigmoid_max / sigmoid_min, defaults 1 and 2)."""
    _, first = np.unique(groups, return_index=True)
    centred = score - score[first].mean()
    # sigmoid(z) - 0.5 == tanh(z / 2) / 2, which cannot overflow.
    phi = np.where(centred > 0, high, low) * np.tanh(5 * centred) / 2
    return 10.0**phi
