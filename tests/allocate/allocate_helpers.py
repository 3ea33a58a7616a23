"""Builders for small allocation test tables."""

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

PAPER_COLUMNS = ("alpha", "alpha_peak", "alpha_hill", "alpha_hill_k1.5")


def layer_table(
    values: Sequence[float],
    *,
    per_block: int = 1,
    shapes: Sequence[tuple[int, int]] | None = None,
    column: str = "alpha",
    prefix: str = "model.layers",
) -> pa.Table:
    """A metrics table with `per_block` layers per block named `{prefix}.{b}.proj{j}`.

    With column "alpha" the values also fill each paper's column, as in a spectral table
    whose alphas all agree, so every policy's default metric reads them.
    """
    names = [f"{prefix}.{i // per_block}.proj{i % per_block}" for i in range(len(values))]
    copies = PAPER_COLUMNS if column == "alpha" else (column,)
    columns = {"name": names, **{c: np.asarray(values, dtype=float) for c in copies}}
    if shapes is not None:
        columns["N"] = [n for n, _ in shapes]
        columns["M"] = [m for _, m in shapes]
    return pa.table(columns)


def weighted_mean(decisions: pa.Table, column: str = "sparsity") -> float:
    params = decisions["params"].to_numpy()
    return float(params @ decisions[column].to_numpy() / params.sum())
