"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch
from torch import nn

from steps.core.blocks import LayerStats, wanda_scores, weight_matrix
from steps.prune.masks import Pattern, select, zero_masked


@torch.no_grad()
def prune_layer(layer: nn.Module, stats: LayerStats, pattern: Pattern) -> None:
    """Zero the lowest-scoring weights of every row (or of every N:M group)."""
    mask = select(wanda_scores(layer, stats), pattern, per_row=True)
    zero_masked(weight_matrix(layer), mask)
