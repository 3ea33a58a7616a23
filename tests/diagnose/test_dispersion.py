"""Dispersion score: distance matrices against brute force, K-medoids truths, the score's laws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from steps.diagnose import dispersion
from steps.diagnose.dispersion import (
    chamfer_distances,
    dispersion_score,
    input_output_dispersion,
    kmedoids,
    mse_distances,
    pairwise_distances,
)


def _clusters(seed: int, spread: float = 0.1, per: int = 6, k: int = 3,
              dim: int = 5) -> torch.Tensor:
    """k well-separated Gaussian clusters of ``per`` points each, float64."""
    gen = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(k, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(k, per, dim, generator=gen, dtype=torch.float64)
    return (centres[:, None] + spread * noise).reshape(k * per, dim)


def test_mse_matrix_is_symmetric_with_zero_diagonal_and_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 3, 4, generator=gen, dtype=torch.float64)
    d = mse_distances(x)
    assert torch.equal(d, d.T)
    assert torch.equal(torch.diag(d), torch.zeros(7, dtype=torch.float64))
    for i, j in itertools.product(range(7), repeat=2):
        assert d[i, j].item() == pytest.approx(((x[i] - x[j]) ** 2).mean().item(), abs=1e-12)


def _chamfer_loop(a: torch.Tensor, b: torch.Tensor) -> float:
    def one_way(src, dst):
        return sum(min(float(((p - q) ** 2).sum()) for q in dst) for p in src) / len(src)

    return one_way(a, b) + one_way(b, a)


def test_chamfer_equals_a_brute_force_double_loop():
    gen = torch.Generator().manual_seed(1)
    clouds = torch.randn(5, 6, 3, generator=gen, dtype=torch.float64)
    d = chamfer_distances(clouds)
    for i, j in itertools.product(range(5), repeat=2):
        assert d[i, j].item() == pytest.approx(_chamfer_loop(clouds[i], clouds[j]), abs=1e-10)
    assert torch.equal(torch.diag(d), torch.zeros(5, dtype=torch.float64))


def test_chunked_matrices_equal_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    clouds = torch.randn(9, 4, 3, generator=gen, dtype=torch.float64)
    whole_chamfer, whole_mse = chamfer_distances(clouds), mse_distances(clouds)
    monkeypatch.setattr(dispersion, "_CHUNK_ELEMENTS", 300)  # a few rows per block
    assert torch.equal(chamfer_distances(clouds), whole_chamfer)
    assert torch.equal(mse_distances(clouds), whole_mse)


def test_score_is_zero_when_n_at_most_k_or_all_points_identical():
    x = _clusters(3)
    assert dispersion_score(x[:3], k=3) == 0.0
    assert dispersion_score(x[:2], k=3) == 0.0
    same = x[:1].repeat(10, 1)
    assert dispersion_score(same, k=2) == 0.0
    assert dispersion_score(same[:, None, :].reshape(10, 5, 1), k=2, distance="chamfer") == 0.0
    assert dispersion_score(x, k=3) > 0.0


def test_score_is_permutation_invariant():
    x = _clusters(4, spread=1.0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
    assert dispersion_score(x[perm], k=3) == pytest.approx(dispersion_score(x, k=3), rel=1e-12)
    clouds = x.reshape(len(x), 5, 1)
    assert dispersion_score(clouds[perm], k=3, distance="chamfer") == pytest.approx(
        dispersion_score(clouds, k=3, distance="chamfer"), rel=1e-12)


def test_score_grows_with_cluster_spread():
    # Same noise, scaled: MSE distances within a cluster scale by spread^2, medoids stay.
    scores = [dispersion_score(_clusters(5, spread=s), k=3) for s in (0.1, 0.2, 0.4)]
    assert scores[0] < scores[1] < scores[2]
    assert scores[1] / scores[0] == pytest.approx(4.0, rel=1e-9)
    assert scores[2] / scores[1] == pytest.approx(4.0, rel=1e-9)


def test_kmedoids_finds_the_obvious_medoids_of_well_separated_clusters():
    offsets = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    centres = np.array([[0, 0], [50, 0], [0, 50]], dtype=float)
    points = (centres[:, None] + offsets[None]).reshape(-1, 2)
    perm = np.random.default_rng(6).permutation(len(points))
    shuffled = points[perm]
    result = kmedoids(mse_distances(torch.from_numpy(shuffled)).numpy(), k=3, seed=6)
    centre_rows = {int(np.flatnonzero(perm == 5 * c)[0]) for c in range(3)}
    assert set(result.medoids.tolist()) == centre_rows
    # Each centre is 1 away (squared, per coordinate: 1/2 in MSE) from its 4 neighbours.
    assert result.inertia == pytest.approx(3 * 4 * 0.5)
    assert len(set(result.labels[perm.argsort()].reshape(3, 5)[:, 0])) == 3


# --- float64 port of the reference (dispersion-score eval/cluster_score.py: scikit-learn-extra
# KMedoids(n_clusters=k, random_state=seed, metric="precomputed", init="k-medoids++"), its
# inertia_ / N, averaged over seeds 1..5), written from the reference code. ---

def _ref_kpp(D, n_clusters, rs):
    n_local_trials = 2 + int(np.log(n_clusters))
    centers = np.empty(n_clusters, dtype=int)
    centers[0] = rs.randint(D.shape[0])
    closest = D[centers[0], :] ** 2
    pot = closest.sum()
    for ci in range(1, n_clusters):
        rand_vals = rs.random_sample(n_local_trials) * pot
        cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rand_vals)
        d_cand = D[cand, :] ** 2
        best_c, best_pot, best_d = None, None, None
        for t in range(n_local_trials):
            new_d = np.minimum(closest, d_cand[t])
            new_pot = new_d.sum()
            if best_c is None or new_pot < best_pot:
                best_c, best_pot, best_d = cand[t], new_pot, new_d
        centers[ci] = best_c
        pot, closest = best_pot, best_d
    return centers


def _ref_kmedoids_inertia(D, n_clusters, seed, max_iter=300):
    rs = np.random.RandomState(seed)
    med = _ref_kpp(D, n_clusters, rs)
    for _ in range(max_iter):
        old = np.copy(med)
        labels = np.argmin(D[med, :], axis=0)
        for k in range(n_clusters):
            idx = np.where(labels == k)[0]
            if len(idx) == 0:
                continue
            costs = np.sum(D[idx, idx[:, np.newaxis]], axis=1)
            j = np.argmin(costs)
            if costs[j] < costs[np.argmax(idx == med[k])]:
                med[k] = idx[j]
        if np.all(old == med):
            break
    return np.sum(np.min(D[:, med], axis=1))


def _ref_dispersion(D, k, seeds=(1, 2, 3, 4, 5)):
    return float(np.mean([_ref_kmedoids_inertia(D, k, s) / D.shape[0] for s in seeds]))


@pytest.mark.parametrize("case", range(6))
def test_dispersion_equals_the_reference_port(case):
    rng = np.random.default_rng(100 + case)
    n, k, dim = [(40, 4, 3), (60, 8, 5), (25, 2, 2), (50, 10, 4), (30, 3, 6), (80, 12, 3)][case]
    centres = rng.normal(scale=4.0, size=(k, dim))
    x = torch.from_numpy(centres[rng.integers(k, size=n)] + rng.normal(size=(n, dim)))
    D = mse_distances(x).numpy()
    assert dispersion_score(x, k) == pytest.approx(_ref_dispersion(D, k), rel=1e-12, abs=0)
    for seed in (1, 7):
        assert kmedoids(D, k, seed=seed).inertia == pytest.approx(
            _ref_kmedoids_inertia(D, k, seed), rel=1e-12)
    clouds = x.reshape(n, dim, 1)
    assert dispersion_score(clouds, k, distance="chamfer") == pytest.approx(
        _ref_dispersion(chamfer_distances(clouds).numpy(), k), rel=1e-12)


def test_dispersion_is_the_mean_distance_to_the_medoid_averaged_over_seeds():
    x = _clusters(8, spread=1.0)
    D = mse_distances(x).numpy()
    per_seed = [kmedoids(D, k=3, seed=s).inertia / len(D) for s in (1, 2, 3, 4, 5)]
    assert dispersion_score(x, k=3) == pytest.approx(float(np.mean(per_seed)), rel=1e-15)
    assert dispersion_score(x, k=3, seeds=(2,)) == pytest.approx(per_seed[1], rel=1e-15)


def test_input_and_output_dispersion_of_recognising_and_identity_predictors():
    x = _clusters(7, spread=0.5)
    templates = x.reshape(3, 6, 5).mean(1)

    def recognise(inputs: torch.Tensor) -> torch.Tensor:  # snap to the nearest template
        return templates[torch.cdist(inputs, templates).argmin(1)]

    recog = input_output_dispersion(recognise, x, k=3)
    assert recog.input > 0.0 and recog.output == 0.0
    ident = input_output_dispersion(lambda t: t.clone(), x, k=3)
    assert ident.output == pytest.approx(ident.input, rel=1e-12)
    as_clouds = input_output_dispersion(lambda t: t.reshape(len(t), 5, 1), x, k=3,
                                        output_distance="chamfer")
    assert as_clouds.output > 0.0 and as_clouds.input == pytest.approx(recog.input)


def test_unknown_distance_and_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match="unknown distance"):
        pairwise_distances(torch.zeros(3, 2), "cosine")
    with pytest.raises(ValueError, match="square"):
        kmedoids(np.zeros((3, 2)), k=1)
