"""Magnitude pruning: zero the smallest |W| of each matrix (no calibration data)."""

from __future__ import annotations

import torch
from torch import nn

from steps.core.blocks import weight_matrix
from steps.prune.masks import Pattern, select, zero_masked


@torch.no_grad()
def prune_layer(layer: nn.Module, pattern: Pattern) -> None:
    """Zero the lowest-|W| weights: per layer for a ratio (as the Wanda repo's baseline),
    per group for N:M."""
    weight = weight_matrix(layer)
    zero_masked(weight, select(weight.abs(), pattern, per_row=False))
