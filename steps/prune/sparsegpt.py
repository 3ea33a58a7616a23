"""SparseGPT (Frantar & Alistarh 2023): OBS-style column-wise pruning with weight updates.

Follows the reference `SparseGPT.fasterprune`: the inverse Hessian of the layer inputs
(H = X^T X, damped by 1 % of its mean diagonal) in its upper Cholesky form; columns are
visited left to right in blocks of 128; within a block the mask is chosen adaptively from
w^2 / [H^-1]_jj^2, every pruned weight's error is spread over the not yet visited columns of
its row, and the block's accumulated error updates the columns to its right.

One change: where the reference prunes `<= threshold` in each 128-column block (ties and
rounding make the layer's sparsity drift), this prunes an exact count per block, chosen so
the running total matches the target: the layer ends at exactly its target sparsity, which
the allocation policies' comparisons rely on. Checked against a float64 port of the
reference (tests/prune/test_sparsegpt_reference.py): N:M masks identical given the same
Hessian; unstructured masks agree on >= 99.9 % of the weights, layer-output error within 0.1 %.
"""

from __future__ import annotations

import torch
from torch import nn

from steps.core.blocks import LayerStats, set_weight_matrix, weight_matrix
from steps.core.errors import TailwiseError
from steps.prune.masks import Pattern, lowest_k, lowest_per_group, pruned_count

DAMPING = 0.01
BLOCK_SIZE = 128


class SparseGPTError(TailwiseError):
    """The Hessian of a layer's calibration inputs cannot be inverted."""


def _upper_cholesky_of_inverse(hessian: torch.Tensor, layer_name: str) -> torch.Tensor:
    """chol(H^-1) as an upper triangle, after damping H's diagonal by 1 % of its mean."""
    hessian = hessian.clone()
    hessian.diagonal().add_(DAMPING * hessian.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info.item() != 0:
        raise SparseGPTError(
            f"{layer_name}: the calibration Hessian is not positive definite even after "
            "damping; use more or longer calibration sequences"
        )
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def _block_mask(
    weights: torch.Tensor, hinv_diag: torch.Tensor, pattern: Pattern, already: int, done: int
) -> torch.Tensor:
    """Adaptive mask of one column block (unstructured): the lowest w^2 / [H^-1]_jj^2, as many
    as keep the running pruned count at the target for the `done` columns so far."""
    scores = weights.square() / hinv_diag.square().unsqueeze(0)
    k = pruned_count(weights.shape[0] * done, pattern.sparsity) - already
    return lowest_k(scores.reshape(1, -1), k).view_as(scores)


@torch.no_grad()
def prune_layer(
    layer: nn.Module, stats: LayerStats, pattern: Pattern, *, layer_name: str = "layer"
) -> None:
    """Prune one layer in place to `pattern`, updating its remaining weights."""
    if stats.hessian is None:
        raise ValueError("SparseGPT needs LayerStats with a Hessian (hessian=True)")
    # float64 throughout: the mask and the updates then do not depend on the thread count
    # (MKL splits its float32 reductions by threads); the result is rounded back once.
    weights = weight_matrix(layer).to(torch.float64, copy=True)
    hessian = stats.hessian.to(torch.float64, copy=True)
    # Inputs that were always zero carry no information: the reference zeroes their weights.
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1
    weights[:, dead] = 0
    hinv = _upper_cholesky_of_inverse(hessian, layer_name)

    columns = weights.shape[1]
    group = pattern.nm[1] if pattern.nm is not None else 0
    pruned_so_far = 0
    for start in range(0, columns, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, columns)
        block = weights[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        errors = torch.zeros_like(block)
        if pattern.nm is None:
            mask = _block_mask(block, hinv_block.diagonal(), pattern, pruned_so_far, end)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if group and i % group == 0:
                # N:M groups are chosen when the walk reaches them, on the updated weights.
                in_group = slice(i, i + group)
                scores = block[:, in_group].square() / hinv_block.diagonal()[in_group].square()
                mask[:, in_group] = lowest_per_group(scores, *pattern.nm)
            column = block[:, i]
            kept = column.masked_fill(mask[:, i], 0)
            error = (column - kept) / hinv_block[i, i]
            block[:, i:].addr_(error, hinv_block[i, i:], alpha=-1)  # rank-1 update
            block[:, i] = kept
            errors[:, i] = error
        weights[:, start:end] = block
        weights[:, end:] -= errors @ hinv[start:end, end:]
        pruned_so_far += int(mask.sum())
    set_weight_matrix(layer, weights)
