"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from steps.core.blocks import LayerStats, wanda_scores, weight_matrix
from steps.prune.masks import Pattern, select, zero_masked

# Scores are compared only within a row (or its N:M groups), so a layer is pruned a slab of
# rows at a time: the scores, their selection copy and the mask take memory for one slab
# (~8 MB of scores) instead of several copies of the matrix (46 MB each for one MLP matrix of
# a 1B model, which made pruning's peak ~250 MB above the model's size).
SLAB_ELEMENTS = 1 << 21


def row_slabs(rows: int, columns: int) -> Iterator[slice]:
    """Consecutive row ranges of about SLAB_ELEMENTS entries (at least one row each)."""
    step = max(1, SLAB_ELEMENTS // max(1, columns))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


@torch.no_grad()
def prune_layer(layer: nn.Module, stats: LayerStats, pattern: Pattern) -> None:
    """Zero the lowest-scoring weights of every row (or of every N:M group)."""
    weight = weight_matrix(layer)
    for rows in row_slabs(*weight.shape):
        mask = select(wanda_scores(layer, stats, rows), pattern, per_row=True)
        zero_masked(weight[rows], mask)
