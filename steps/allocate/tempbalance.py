"""TempBalance: layer-wise learning-rate factors from alpha (METHODS.md section 2).

Higher alpha (under-trained) learns faster. Two variants:
- linear (TB): factor = linear map of alpha from [alpha_min, alpha_max] onto
  [lr_min, lr_max] = [0.5, 1.5], per layer;
- sigmoid (TB_Sigmoid, low-data fine-tuning): factor = 10^phi with
  phi = s * (sigmoid(10 * (alpha_b - mean_b alpha_b)) - 0.5), per block.
The first and last layers, and layers with fewer than `min_eigs` eigenvalues
(the pooled count, or min(N, M)), are left out and keep factor 1.0, as in the TB code.
First and last mean the table's first and last rows: analyse with min_evals=1 so that
they are the model's (the spectral step skips tiny matrices by default).
"""

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from steps.allocate.layers import (
    block_column,
    block_ids,
    block_means,
    decisions_table,
    fail,
    layer_names,
    metric_values,
    min_max_unit,
)


class TempBalanceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["linear", "sigmoid"] = "linear"
    metric: str = Field("alpha", description="metric column (hill alpha in the papers)")
    lr_min: float = Field(0.5, gt=0, description="linear: factor at the lowest alpha")
    lr_max: float = Field(1.5, gt=0, description="linear: factor at the highest alpha")
    scale: float = Field(1.0, gt=0, description="sigmoid: s, factors span 10^(+-s/2)")
    by_block: bool | None = Field(
        None, description="use block means; default False for linear, True for sigmoid"
    )
    exclude_first_last: bool = Field(True, description="first and last layers keep factor 1.0")
    min_eigs: int = Field(50, ge=0, description="layers with min(N, M) below this keep 1.0")

    @model_validator(mode="after")
    def _check_range(self) -> "TempBalanceOptions":
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min {self.lr_min} > lr_max {self.lr_max}")
        return self

    @property
    def blockwise(self) -> bool:
        return self.by_block if self.by_block is not None else self.variant == "sigmoid"


def allocate(metrics: pa.Table, options: TempBalanceOptions) -> pa.Table:
    """Per-layer learning-rate factors (multiply the global schedule eta_t by them)."""
    names = layer_names(metrics)
    alpha = metric_values(metrics, options.metric)
    blocks = block_ids(metrics, required=options.blockwise)
    included = _included(metrics, options)
    if not included.any():
        raise fail(metrics, "no layer left to balance after excluding first/last and small ones")

    groups = blocks if options.blockwise else np.arange(len(names))
    score, factor = lr_factors(alpha, groups, included, options)

    columns = {
        "name": names,
        "block": block_column(blocks, len(names)),
        options.metric: alpha,
        "score": score,
        "included": included,
        "lr_factor": factor,
    }
    return decisions_table(columns, policy="tempbalance", options=options, source=metrics)


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
        factor[included] = _sigmoid_factors(score[included], groups[included], options.scale)
    return score, factor


def _included(metrics: pa.Table, options: TempBalanceOptions) -> np.ndarray:
    """Layers that take part in balancing."""
    included = np.ones(metrics.num_rows, dtype=bool)
    if options.exclude_first_last:
        included[[0, -1]] = False
    n_eigs = _eigenvalue_counts(metrics)
    if n_eigs is not None:
        included &= n_eigs >= options.min_eigs
    return included


def _eigenvalue_counts(metrics: pa.Table) -> np.ndarray | None:
    """Eigenvalues per layer: the spectral step's pooled count (a conv layer's kh*kw slices
    together, as the TempBalance scheduler and the TB code count), else min(N, M)."""
    if "num_evals" in metrics.column_names:
        return metric_values(metrics, "num_evals")
    if "N" in metrics.column_names and "M" in metrics.column_names:
        return np.minimum(metric_values(metrics, "N"), metric_values(metrics, "M"))
    return None


def _sigmoid_factors(score: np.ndarray, groups: np.ndarray, scale: float) -> np.ndarray:
    """10^phi, phi = s * (sigmoid(10 * (alpha_b - mean alpha)) - 0.5); mean over blocks."""
    _, first = np.unique(groups, return_index=True)
    centred = score - score[first].mean()
    # sigmoid(z) - 0.5 == tanh(z / 2) / 2, which cannot overflow.
    phi = scale * np.tanh(5 * centred) / 2
    return 10.0**phi
