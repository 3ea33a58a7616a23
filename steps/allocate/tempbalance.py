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
The metric is the papers' hill alpha by default: alpha_hill (k = 2) for the linear rule,
alpha_hill_k1.5 for TB_Sigmoid.
"""

import numpy as np
import pyarrow as pa
from pydantic import Field

from steps.allocate.layers import (
    block_column,
    block_ids,
    decisions_table,
    fail,
    layer_names,
    metric_values,
)
from steps.core.balance import TempBalanceOptions as RuleOptions
from steps.core.balance import lr_factors

__all__ = ["TempBalanceOptions", "allocate"]

PAPER_METRIC = {"linear": "alpha_hill", "sigmoid": "alpha_hill_k1.5"}


class TempBalanceOptions(RuleOptions):
    metric: str | None = Field(None, description="metric column; default the paper's hill "
                               "alpha: alpha_hill (linear), alpha_hill_k1.5 (sigmoid)")


def allocate(metrics: pa.Table, options: TempBalanceOptions) -> pa.Table:
    """Per-layer learning-rate factors (multiply the global schedule eta_t by them)."""
    if options.metric is None:
        options = options.model_copy(update={"metric": PAPER_METRIC[options.variant]})
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
