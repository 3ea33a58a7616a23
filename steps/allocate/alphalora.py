"""AlphaLoRA: LoRA experts per block from heavy-tail metrics (METHODS.md section 2).

n_l = round(T * alpha_l^beta / sum alpha^beta) on block means of alpha; the total is
then fixed to exactly T. top_k = 2 where n_l > 1, else 1. Higher alpha, more experts.
One output row per block (the decision is per decoder layer), named by the block's
module path, e.g. `model.layers.3`.
"""

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from steps.allocate.layers import (
    block_ids,
    block_prefix,
    decisions_table,
    fail,
    layer_names,
    metric_values,
)


class AlphaLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    total: int = Field(160, ge=1, description="T, total number of experts over all blocks")
    beta: float = Field(2.5, ge=0, description="exponent on the block alpha")
    metric: str = Field("alpha_peak", description="metric column: the paper's alpha_peak by "
                        "default")
    mode: Literal["residual", "reference"] = Field(
        "residual",
        description="residual: fix the total on the largest rounding residuals, at least one "
        "expert per block; reference: the AlphaLoRA code's fix by un-normalised alpha^beta",
    )


def allocate(metrics: pa.Table, options: AlphaLoraOptions) -> pa.Table:
    """Expert counts per block, summing exactly to `total`."""
    names = layer_names(metrics)
    alpha = metric_values(metrics, options.metric, positive=True)
    blocks = block_ids(metrics)
    unique, first, inverse = np.unique(blocks, return_index=True, return_inverse=True)
    block_alpha = np.bincount(inverse, weights=alpha) / np.bincount(inverse)
    if options.mode == "residual" and options.total < len(unique):
        raise fail(metrics, f"total {options.total} experts is fewer than the {len(unique)} blocks")

    weight = block_alpha**options.beta
    if options.mode == "reference":
        experts = reference_counts(weight, options.total)
        if (experts < 1).any():
            bad = int(unique[np.argmin(experts)])
            raise fail(metrics, f"reference rounding gives block {bad} {experts.min()} experts")
    else:
        experts = residual_counts(options.total * weight / weight.sum())

    columns = {
        "name": [block_prefix(names[i], int(b)) for i, b in zip(first, unique, strict=True)],
        "block": pa.array(unique, pa.int64()),
        "layers": np.bincount(inverse),
        options.metric: block_alpha,
        "experts": pa.array(experts, pa.int64()),
        "top_k": pa.array(np.where(experts > 1, 2, 1), pa.int64()),
    }
    return decisions_table(columns, policy="alphalora", options=options, source=metrics)


def residual_counts(quota: np.ndarray, minimum: int = 1) -> np.ndarray:
    """Round quotas to integers >= minimum with the same (integer) total.

    One expert at a time goes to the block whose quota exceeds its count the most,
    or is taken from the block whose count exceeds its quota the most.
    """
    target = round(quota.sum())
    counts = np.maximum(np.round(quota), minimum).astype(np.int64)
    while counts.sum() < target:
        counts[np.argmax(quota - counts)] += 1
    while counts.sum() > target:
        excess = np.where(counts > minimum, counts - quota, -np.inf)
        counts[np.argmax(excess)] -= 1
    return counts


def reference_counts(weight: np.ndarray, total: int) -> np.ndarray:
    """The AlphaLoRA code's rule: round the normalised quotas, then fix the total one at a
    time on argmin / argmax of (un-normalised alpha^beta - count)."""
    counts = np.round(weight / weight.sum() * total).astype(np.int64)
    while counts.sum() != total:
        if counts.sum() < total:
            counts[np.argmin(weight - counts)] += 1
        else:
            counts[np.argmax(weight - counts)] -= 1
    return counts
