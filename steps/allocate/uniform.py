"""Uniform sparsity: every layer gets the global target S."""

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from steps.allocate.layers import (
    block_column,
    block_ids,
    decisions_table,
    layer_names,
    param_counts,
)


class UniformOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(0.5, ge=0, lt=1, description="global target sparsity S in [0, 1)")


def allocate(metrics: pa.Table, options: UniformOptions) -> pa.Table:
    """sparsity = S for every layer."""
    names = layer_names(metrics)
    blocks = block_ids(metrics, required=False)
    columns = {
        "name": names,
        "block": block_column(blocks, len(names)),
        "params": param_counts(metrics),
        "sparsity": np.full(len(names), options.sparsity),
    }
    return decisions_table(columns, policy="uniform", options=options, source=metrics)
