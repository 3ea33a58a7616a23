"""METHODS.md section 1 "known truths", each on seeded data with a stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steps.core.esd import gram_eigenvalues
from steps.core.fits import fit_power_law
from steps.spectral import analyze


def _linear_with(weight: np.ndarray) -> torch.nn.Module:
    # float64 so that c * W is exact to rounding (float32 would move alpha by ~1e-8).
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    return torch.nn.Sequential(layer)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_eigenvalues_give_alpha_shape_plus_one(seed):
    # Classical Pareto with shape a = 2.5 has pdf ~ x^-(a+1): alpha ~ 3.5. With 10,000
    # samples the KS fit's spread is a few hundredths; tolerance 0.1.
    evals = np.random.default_rng(seed).pareto(2.5, 10_000) + 1.0
    assert fit_power_law(evals).alpha == pytest.approx(3.5, abs=0.1)


@pytest.mark.parametrize("seed", [0, 1])
def test_student_t_matrix_gives_alpha_near_one_and_a_half(seed):
    # i.i.d. Student-t(nu = 1) entries, 2000 x 1000: alpha ~ nu / 2 + 1 = 1.5
    # (METHODS: ~1.45-1.5); tolerance 0.1.
    weight = np.random.default_rng(seed).standard_t(1, (2000, 1000))
    alpha = fit_power_law(gram_eigenvalues(torch.from_numpy(weight))).alpha
    assert alpha == pytest.approx(1.5, abs=0.1)


def test_gaussian_matrix_is_flagged_under_trained_with_lambda_max_at_the_mp_edge():
    rows, cols, std = 2000, 1000, 0.5
    weight = np.random.default_rng(0).normal(0.0, std, (rows, cols))
    table = analyze(_linear_with(weight), device="cpu").to_pylist()
    (row,) = table
    assert row["alpha"] > 6 and row["warning"] == "under-trained"
    # Marchenko-Pastur edge (1 + sqrt(M/N))^2 * N * var; finite-size fluctuations are
    # well under 3 % at this size.
    edge = (1 + np.sqrt(cols / rows)) ** 2 * rows * std**2
    assert row["lambda_max"] == pytest.approx(edge, rel=0.03)
    assert (row["N"], row["M"], row["num_evals"]) == (rows, cols, cols)


def test_hill_on_pure_noise_is_biased_by_aspect_ratio():
    # METHODS: about 2.7 for a pure-noise matrix with N/M = 2 (tolerance 0.1).
    weight = np.random.default_rng(1).standard_normal((1200, 600))
    evals = gram_eigenvalues(torch.from_numpy(weight))
    assert fit_power_law(evals, estimator="hill", hill_k=2).alpha == pytest.approx(2.7, abs=0.1)


@pytest.mark.parametrize("estimator", ["ks", "alpha_peak_corrected", "hill"])
def test_alpha_is_scale_invariant_and_log_norm_shifts(estimator):
    weight = np.random.default_rng(2).standard_t(3, (300, 200))
    c = 7.5
    base = analyze(_linear_with(weight), estimator=estimator, device="cpu").to_pylist()[0]
    scaled = analyze(_linear_with(c * weight), estimator=estimator, device="cpu").to_pylist()[0]
    assert scaled["alpha"] == pytest.approx(base["alpha"], rel=1e-9)
    assert scaled["log_norm"] == pytest.approx(base["log_norm"] + np.log10(c**2), abs=1e-9)
    assert scaled["stable_rank"] == pytest.approx(base["stable_rank"], rel=1e-9)
