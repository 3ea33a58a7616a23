"""Dispersion score: does a network recognise (collapse onto templates) or reconstruct?

For N samples: a pairwise distance matrix (feature MSE for images, Chamfer distance for
point clouds), K-medoids on it, and score = the sum of every sample's distance to its medoid
(unnormalised). Computed on the inputs and on the predictions: an output dispersion far below
the input dispersion means the predictions collapse onto a few templates (recognition).

The score is 0 when N <= K or all samples are identical, is invariant to the order of the
samples, and grows with the spread of the clusters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

DISTANCES = ("mse", "chamfer")

_CHUNK_ELEMENTS = 1 << 24  # size of the largest difference tensor built at once


def mse_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, N): mean over features of the squared difference of flattened samples.

    Differences are taken explicitly (not by ||a||^2 + ||b||^2 - 2ab), so the matrix is
    exactly symmetric with a zero diagonal and identical samples are exactly 0 apart.
    """
    flat = x.flatten(1)
    if len(flat) == 0:
        return flat.new_zeros(0, 0)
    rows = max(1, _CHUNK_ELEMENTS // max(1, flat.numel()))
    return torch.cat([(block[:, None] - flat[None]).pow(2).mean(-1) for block in flat.split(rows)])


def chamfer_distances(clouds: torch.Tensor) -> torch.Tensor:
    """(N, P, D) point clouds -> (N, N) symmetric Chamfer distances.

    chamfer(a, b) = mean_p min_q ||a_p - b_q||^2 + mean_q min_p ||b_q - a_p||^2: squared
    Euclidean nearest-neighbour distances, averaged over each cloud's points, both directions
    summed. All clouds have P points.
    """
    if clouds.ndim != 3:
        raise ValueError(f"expected point clouds of shape (N, P, D), got {tuple(clouds.shape)}")
    if len(clouds) == 0:
        return clouds.new_zeros(0, 0)
    rows = max(1, _CHUNK_ELEMENTS // max(1, clouds.numel() * clouds.shape[1]))
    out = []
    for block in clouds.split(rows):
        # (rows, N, P, P): squared distance from point i of a block cloud to point j of another.
        sq = (block[:, None, :, None, :] - clouds[None, :, None, :, :]).pow(2).sum(-1)
        out.append(sq.min(3).values.mean(-1) + sq.min(2).values.mean(-1))
    return torch.cat(out)


def pairwise_distances(x: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """The (N, N) distance matrix of samples x under ``distance`` ("mse" or "chamfer")."""
    if distance == "mse":
        return mse_distances(x)
    if distance == "chamfer":
        return chamfer_distances(x)
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


@dataclass(frozen=True)
class KMedoids:
    """Medoid indices (into the samples), each sample's cluster label and the score."""

    medoids: np.ndarray
    labels: np.ndarray
    score: float


def kmedoids(distances: np.ndarray | torch.Tensor, k: int, *, restarts: int = 10,
             max_iter: int = 100, seed: int = 0) -> KMedoids:
    """K-medoids on a precomputed (N, N) distance matrix: alternating assignment / medoid
    update from k-medoids++ starts, the best (lowest score) of ``restarts`` runs.

    score = sum over samples of the distance to their medoid. With N <= k every sample is
    its own medoid and the score is 0.
    """
    dist = np.asarray(distances, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"expected a square distance matrix, got shape {dist.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = dist.shape[0]
    if n <= k:
        return KMedoids(np.arange(n), np.arange(n), 0.0)
    rng = np.random.default_rng(seed)
    best: KMedoids | None = None
    for _ in range(restarts):
        run = _alternate(dist, _plus_plus_init(dist, k, rng), max_iter)
        if best is None or run.score < best.score:
            best = run
    return best


def _plus_plus_init(dist: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-medoids++: the first medoid uniformly, each next one with probability proportional
    to its distance to the nearest medoid chosen so far."""
    n = dist.shape[0]
    medoids = [int(rng.integers(n))]
    for _ in range(k - 1):
        nearest = dist[:, medoids].min(1)
        nearest[medoids] = 0.0
        total = nearest.sum()
        if total > 0:
            medoids.append(int(rng.choice(n, p=nearest / total)))
        else:  # every sample sits on a medoid (duplicates): any unused sample will do
            medoids.append(int(rng.choice(np.setdiff1d(np.arange(n), medoids))))
    return np.array(medoids)


def _alternate(dist: np.ndarray, medoids: np.ndarray, max_iter: int) -> KMedoids:
    """Assign samples to the nearest medoid, move each medoid to the member with the least
    total distance to its cluster, until the medoids stop moving."""
    for _ in range(max_iter):
        labels = dist[:, medoids].argmin(1)
        updated = medoids.copy()
        for c in range(len(medoids)):
            members = np.flatnonzero(labels == c)
            if len(members):
                updated[c] = members[dist[np.ix_(members, members)].sum(1).argmin()]
        if np.array_equal(updated, medoids):
            break
        medoids = updated
    labels = dist[:, medoids].argmin(1)
    score = float(dist[np.arange(len(dist)), medoids[labels]].sum())
    return KMedoids(medoids, labels, score)


def dispersion_score(x: torch.Tensor, k: int, *, distance: str = "mse", restarts: int = 10,
                     seed: int = 0) -> float:
    """Sum of distances of the samples x to their K-medoids medoid (unnormalised)."""
    dist = pairwise_distances(x.detach(), distance).double().cpu().numpy()
    return kmedoids(dist, k, restarts=restarts, seed=seed).score


@dataclass(frozen=True)
class Dispersion:
    input: float
    output: float


def input_output_dispersion(
    predict: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    k: int,
    *,
    input_distance: str = "mse",
    output_distance: str = "mse",
    restarts: int = 10,
    seed: int = 0,
) -> Dispersion:
    """Dispersion of the inputs and of the predictions ``predict(inputs)``.

    The distances may differ, e.g. images in and point clouds out (single-view 3D
    reconstruction): ``input_distance="mse", output_distance="chamfer"``.
    """
    with torch.no_grad():
        outputs = predict(inputs)
    return Dispersion(
        input=dispersion_score(inputs, k, distance=input_distance, restarts=restarts, seed=seed),
        output=dispersion_score(outputs, k, distance=output_distance, restarts=restarts,
                                seed=seed),
    )
