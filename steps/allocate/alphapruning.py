"""AlphaPruning: layer-wise sparsity from heavy-tail metrics (METHODS.md section 2).

Higher alpha (less well trained) is pruned more:
  s_i = (a_i - a_min) / (a_max - a_min) * 2 eps + (1 - eps),   a_i = block mean of alpha
  sparsity_i = s_i * S * sum(P) / sum(P_i s_i),                P_i = N_i * M_i
"""

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from steps.allocate.budget import fit_budget
from steps.allocate.layers import (
    block_column,
    block_ids,
    decisions_table,
    fail,
    layer_names,
    metric_values,
    param_counts,
)
from steps.core.balance import block_means, min_max_unit


class AlphaPruningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(0.7, ge=0, lt=1, description="global target sparsity S in [0, 1)")
    epsilon: float = Field(0.3, ge=0, lt=1, description="spread: s_i in [1 - eps, 1 + eps]")
    metric: str = Field("alpha_peak", description="metric column: the paper's alpha_peak by "
                        "default (e.g. alpha_peak_farms for FARMS, alpha for --estimator's)")
    by_block: bool = Field(True, description="use block means of the metric (the paper's default)")
    mode: Literal["clipped", "reference"] = Field(
        "clipped",
        description="reference: no clipping, as the paper's code; clipped: keep sparsities in "
        "[0, max_sparsity] and redistribute the excess so the global target still holds",
    )
    max_sparsity: float = Field(0.99, gt=0, lt=1, description="upper clip in clipped mode")


def allocate(metrics: pa.Table, options: AlphaPruningOptions) -> pa.Table:
    """Per-layer sparsity whose parameter-weighted mean is exactly the target."""
    names = layer_names(metrics)
    alpha = metric_values(metrics, options.metric)
    blocks = block_ids(metrics, required=options.by_block)
    params = param_counts(metrics)
    score = block_means(alpha, blocks) if options.by_block else alpha

    ratio = min_max_unit(score) * 2 * options.epsilon + (1 - options.epsilon)
    sparsity = ratio * options.sparsity * params.sum() / (params @ ratio)
    clipped = np.zeros(len(names), dtype=bool)
    if options.mode == "clipped" and sparsity.max() > options.max_sparsity:
        if options.sparsity > options.max_sparsity:
            raise fail(
                metrics,
                f"target sparsity {options.sparsity} exceeds max_sparsity {options.max_sparsity}",
            )
        sparsity, clipped = fit_budget(
            ratio, params, options.sparsity, low=0.0, high=options.max_sparsity, how="scale"
        )

    columns = {
        "name": names,
        "block": block_column(blocks, len(names)),
        "params": params,
        options.metric: alpha,
        "score": score,
        "sparsity": sparsity,
        "clipped": clipped,
    }
    return decisions_table(
        columns,
        policy="alphapruning",
        options=options,
        source=metrics,
        clipped=bool(clipped.any()),
        exceeds_one=bool((sparsity >= 1).any()),
    )
