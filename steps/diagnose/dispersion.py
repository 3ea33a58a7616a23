"""Dispersion score: does a network recognise (collapse onto templates) or reconstruct?

For N samples: a pairwise distance matrix (feature MSE for images, Chamfer distance for
point clouds), K-medoids on it, and score = the mean over samples of each sample's distance
to its medoid (the sum divided by N), with one k-medoids++ start per seed and the score
averaged over the seeds, as the reference code (YefanZhou/dispersion-score,
``eval/cluster_score.py``) runs it. Computed on the inputs and on the predictions: an output
dispersion far below the input dispersion means the predictions collapse onto a few
templates (recognition).

The score is 0 when N <= K or all samples are identical, is invariant to the order of the
samples, and grows with the spread of the clusters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


REFERENCE_SEEDS = (1, 2, 3, 4, 5)  # the seeds the reference averages its scores over


@dataclass(frozen=True)
class KMedoids:
    """Medoid indices (into the samples), each sample's cluster label and the inertia (sum of
    every sample's distance to its medoid)."""

    medoids: np.ndarray
    labels: np.ndarray
    inertia: float


def kmedoids(distances: np.ndarray | torch.Tensor, k: int, *, seed: int = 1,
             max_iter: int = 300) -> KMedoids:
    """K-medoids on a precomputed (N, N) distance matrix, as the reference runs it
    (scikit-learn-extra ``KMedoids(init="k-medoids++", method="alternate",
    metric="precomputed", random_state=seed)``): one k-medoids++ start drawn from
    ``np.random.RandomState(seed)``, then alternating assignment / medoid updates.

    With N <= k every sample is its own medoid and the inertia is 0.
    """
    dist = np.asarray(distances, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"expected a square distance matrix, got shape {dist.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = dist.shape[0]
    if n <= k:
        return KMedoids(np.arange(n), np.arange(n), 0.0)
    medoids = _plus_plus_init(dist, k, np.random.RandomState(seed))
    return _alternate(dist, medoids, max_iter)


def _plus_plus_init(dist: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """k-medoids++ with greedy local trials (Arthur & Vassilvitskii's k-means++ code, as
    scikit-learn-extra ports it): the first medoid uniformly; each next one is the best, by
    the summed squared distance to the nearest medoid, of 2 + int(ln k) candidates drawn with
    probability proportional to that squared distance."""
    trials = 2 + int(np.log(k))
    medoids = [int(rng.randint(dist.shape[0]))]
    nearest_sq = dist[medoids[0]] ** 2
    for _ in range(k - 1):
        targets = rng.random_sample(trials) * nearest_sq.sum()
        candidates = np.searchsorted(np.cumsum(nearest_sq), targets)
        potentials = np.minimum(nearest_sq[None], dist[candidates] ** 2)
        best = int(potentials.sum(1).argmin())  # first candidate on ties, as the reference
        medoids.append(int(candidates[best]))
        nearest_sq = potentials[best]
    return np.array(medoids)


def _alternate(dist: np.ndarray, medoids: np.ndarray, max_iter: int) -> KMedoids:
    """Assign samples to the nearest medoid; move each medoid to the member with the least
    total distance to its cluster when that is strictly less than the current medoid's;
    stop when no medoid moves."""
    medoids = medoids.copy()
    for _ in range(max_iter):
        labels = dist[:, medoids].argmin(1)
        previous = medoids.copy()
        for c in range(len(medoids)):
            members = np.flatnonzero(labels == c)
            if len(members) == 0:  # an empty cluster keeps its medoid
                continue
            costs = dist[np.ix_(members, members)].sum(1)
            own = np.flatnonzero(members == medoids[c])
            # A medoid outside its own cluster (duplicate points) is costed as the reference
            # does: as its cluster's first member.
            current = costs[own[0] if len(own) else 0]
            if costs.min() < current:
                medoids[c] = members[costs.argmin()]
        if np.array_equal(previous, medoids):
            break
    labels = dist[:, medoids].argmin(1)
    return KMedoids(medoids, labels, float(dist[:, medoids].min(1).sum()))


def dispersion_score(x: torch.Tensor, k: int, *, distance: str = "mse",
                     seeds: Sequence[int] = REFERENCE_SEEDS) -> float:
    """Mean over ``seeds`` of the K-medoids inertia divided by N: the average distance of
    a sample to its medoid, one k-medoids++ start per seed (the reference's
    ``kmedoids.inertia_ / dm.shape[0]``, averaged over its seeds 1-5)."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    dist = pairwise_distances(x.detach(), distance).double().cpu().numpy()
    if len(dist) == 0:
        return 0.0
    return float(np.mean([kmedoids(dist, k, seed=s).inertia / len(dist) for s in seeds]))


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
    seeds: Sequence[int] = REFERENCE_SEEDS,
) -> Dispersion:
    """Dispersion of the inputs and of the predictions ``predict(inputs)``.

    The distances may differ, e.g. images in and point clouds out (single-view 3D
    reconstruction): ``input_distance="mse", output_distance="chamfer"``.
    """
    with torch.no_grad():
        outputs = predict(inputs)
    return Dispersion(
        input=dispersion_score(inputs, k, distance=input_distance, seeds=seeds),
        output=dispersion_score(outputs, k, distance=output_distance, seeds=seeds),
    )
