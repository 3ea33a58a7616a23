"""Which weights to prune, from importance scores: True in a mask means "set to zero".

Lower score = less important. Ties break by position, so masks are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from steps.core.errors import TailwiseError


class PatternError(TailwiseError, ValueError):
    """A sparsity or N:M pattern that cannot be applied."""


@dataclass(frozen=True)
class Pattern:
    """What to prune in one layer: a sparsity ratio, or N:M (keep N of every M consecutive
    input weights of a row, NVIDIA's semi-structured sparsity; 2:4 and 4:8 are 50 %)."""

    sparsity: float
    nm: tuple[int, int] | None = None

    @classmethod
    def n_of_m(cls, n: int, m: int) -> Pattern:
        return cls(sparsity=(m - n) / m, nm=(n, m))


def pruned_count(total: int, sparsity: float) -> int:
    """How many of `total` weights a sparsity ratio prunes (nearest integer)."""
    return round(total * sparsity)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def kth_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th lowest score along the last dimension (1 <= k <= its size), kept as a
    dimension of size 1."""
    if scores.device.type == "cpu" and scores.dtype in _NUMPY_FLOATS:
        # numpy's introselect (np.partition) is about 6x faster on CPU than torch's topk or
        # kthvalue on rows of a few hundred to ten thousand scores; it works on a copy.
        partitioned = np.partition(scores.detach().numpy(), k - 1, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(partitioned[..., k - 1 : k]))
    return scores.topk(k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest scores along the last dimension; among equal scores the first
    positions go first (as a stable sort). Uses a selection, not a full sort."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = kth_lowest(scores, k)
    at_most = scores <= kth
    if int(at_most.count_nonzero()) == k * (scores.numel() // scores.shape[-1]):
        return at_most  # no score equal to the k-th lowest is left out: nothing to break
    below = scores < kth
    ties = at_most & ~below
    still_needed = k - below.sum(dim=-1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=-1) <= still_needed))


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the same number of lowest scores in every row (Wanda's per-output comparison)."""
    return lowest_k(scores, pruned_count(scores.shape[1], sparsity))


def lowest_overall(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of the whole matrix (magnitude pruning's per-layer threshold)."""
    flat = scores.reshape(1, -1)
    return lowest_k(flat, pruned_count(flat.shape[1], sparsity)).view_as(scores)


def lowest_per_group(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of m consecutive columns of a row, prune the m - n lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise PatternError(
            f"{n}:{m} sparsity needs the input width ({cols}) to be a multiple of {m}"
        )
    return lowest_k(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def select(scores: torch.Tensor, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """The mask for a pattern: N:M groups, else the lowest scores per row or overall."""
    if pattern.nm is not None:
        return lowest_per_group(scores, *pattern.nm)
    if per_row:
        return lowest_per_row(scores, pattern.sparsity)
    return lowest_overall(scores, pattern.sparsity)


def zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set weight to +0.0 where mask is True, in place.

    A multiply by the kept mask, several times faster on CPU than weight[mask] = 0 or
    masked_fill_ (whose per-element branch mispredicts on a half-random mask); adding 0.0
    turns the -0.0 of negative pruned weights into +0.0. Pruned weights are finite (the
    lowest scores), so no 0 * inf appears.
    """
    weight.mul_(mask.logical_not()).add_(0.0)


def count_zeros(weight: torch.Tensor) -> int:
    """How many entries are exactly zero (counted without a mask the size of the matrix)."""
    return weight.numel() - int(torch.count_nonzero(weight))
