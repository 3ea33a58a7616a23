"""The vectorised fits against ports of the reference loops (WeightWatcher's KS loop,
AlphaPruning / TempBalance's xmin_peak and xmin_mid, written from their code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_ports import analysis_esd, xmin_peak_bounds
from spectral_helpers import reference_ks_fit

from steps.core.fits import fit_power_law, peak_candidates


def _spectra(seed: int) -> list[np.ndarray]:
    """Assorted ESDs: MP bulk, heavy-tailed matrices, Pareto, ties, tiny and large."""
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((600, 300))
    heavy = rng.standard_t(2, (500, 400))
    return [
        np.linalg.eigvalsh(gauss.T @ gauss),
        np.linalg.eigvalsh(heavy.T @ heavy),
        rng.pareto(2.0, 3000) + 1.0,  # > 2 * 128 eigenvalues: exercises the bound pruning
        rng.lognormal(0.0, 2.0, 1500),
        np.repeat(rng.uniform(1, 5, 40), 3),  # ties
        rng.uniform(0.5, 2.0, 12),
        np.array([0.0, 1e-7, 2.0, 3.0]),  # ks drops near-zero eigenvalues
    ]


def reference_peak(evals: np.ndarray) -> float:
    """The histogram peak of xmin_peak (every eigenvalue kept), from its upper bound."""
    return xmin_peak_bounds(torch.from_numpy(np.sort(evals)))[1] / 1.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_matches_the_weightwatcher_loop(seed):
    for evals in _spectra(seed):
        fit = fit_power_law(evals, estimator="ks")
        alpha, xmin, d = reference_ks_fit(evals)
        assert fit.status == "ok"
        assert fit.xmin == xmin  # the same candidate wins
        assert fit.alpha == pytest.approx(alpha, rel=1e-10)
        assert fit.D == pytest.approx(d, rel=1e-9, abs=1e-12)
        assert fit.num_pl_spikes == np.count_nonzero(evals >= xmin)
        assert fit.sigma == pytest.approx((alpha - 1) / np.sqrt(fit.num_pl_spikes), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_alpha_peak_matches_the_reference_loop_quirk_included(seed):
    for evals in _spectra(seed)[:5]:
        fit = fit_power_law(evals, estimator="alpha_peak")
        assert fit.alpha == pytest.approx(analysis_esd(torch.from_numpy(evals), "xmin_peak"),
                                          rel=1e-10)


def test_alpha_peak_and_hill_keep_near_zero_eigenvalues_ks_drops_them():
    rng = np.random.default_rng(4)
    evals = np.concatenate([[3e-7, 2e-6], rng.pareto(2.0, 400) + 1.0])
    kept = fit_power_law(evals, estimator="alpha_peak")
    assert kept.alpha == pytest.approx(analysis_esd(torch.from_numpy(evals), "xmin_peak"))
    hill = fit_power_law(evals, estimator="hill", hill_k=1.5)
    reference_hill = analysis_esd(torch.from_numpy(evals), "xmin_mid", xmin_pos=1.5)
    assert hill.alpha == pytest.approx(reference_hill, rel=1e-10)
    assert hill.xmin == np.sort(evals)[int(len(evals) / 1.5)]
    assert fit_power_law(evals, estimator="ks").alpha == pytest.approx(
        reference_ks_fit(evals)[0], rel=1e-10)
    assert reference_ks_fit(evals)[0] == reference_ks_fit(evals[2:])[0]


def test_numerical_zeros_are_left_out_of_alpha_peak():
    # An exact zero makes the reference's log histogram fail; it is no eigenvalue to fit.
    evals = np.random.default_rng(5).pareto(2.0, 300) + 1.0
    with_zero = np.concatenate([[0.0, 1e-18], evals])
    assert fit_power_law(with_zero, estimator="alpha_peak") == fit_power_law(
        evals, estimator="alpha_peak")


def _cluster_on_top(seed: int = 0) -> np.ndarray:
    """A Pareto body from 4 and a tight cluster at 4000 that makes the histogram's mode."""
    rng = np.random.default_rng(seed)
    body = 4 * (rng.pareto(1.0, 6000) + 1)
    return np.concatenate([body[body < 3000], rng.uniform(4000, 4040, 600)])


def test_alpha_peak_variants_differ_where_the_lower_bound_matters():
    evals = _cluster_on_top()
    peak = reference_peak(evals)
    quirk = fit_power_law(evals, estimator="alpha_peak")
    corrected = fit_power_law(evals, estimator="alpha_peak_corrected")
    # The quirk's bound log10(0.95 * peak) ~ 3.55 lets the body (from 4) in; it wins.
    assert np.log10(0.95 * peak) <= quirk.xmin < 0.95 * peak
    assert quirk.alpha == pytest.approx(fit_power_law(evals, estimator="ks").alpha)
    # Corrected: xmin within [0.95, 1.5] * peak, i.e. inside the cluster.
    assert 0.95 * peak <= corrected.xmin <= 1.5 * peak
    assert corrected.alpha > 100 and quirk.alpha < 2


@pytest.mark.parametrize("seed", range(6))
def test_alpha_peak_variants_agree_when_the_quirk_picks_above_the_bound(seed):
    # Corrected candidates are a subset of the quirk's (x > log10 x), so the two can only
    # differ when the quirk's winner lies below 0.95 * peak.
    for evals in _spectra(seed)[:4]:
        evals = evals * 10.0 ** (seed - 2)  # moves the quirk's bound relative to the ESD
        peak = reference_peak(evals)
        quirk = fit_power_law(evals, estimator="alpha_peak")
        corrected = fit_power_law(evals, estimator="alpha_peak_corrected")
        if quirk.xmin >= 0.95 * peak:
            assert corrected == quirk
        else:
            assert corrected.xmin >= 0.95 * peak


def test_peak_candidates_bounds():
    evals = _cluster_on_top()
    x = np.sort(evals)
    peak = reference_peak(evals)
    quirk = peak_candidates(x, corrected=False)
    corrected = peak_candidates(x, corrected=True)
    assert np.all(x[:-1][quirk] >= np.log10(0.95 * peak))
    assert np.all(x[:-1][corrected] >= 0.95 * peak)
    assert np.all(x[:-1][quirk | corrected] <= 1.5 * peak)
    assert np.all(quirk[corrected])


@pytest.mark.parametrize("k", [2.0, 1.5])
def test_hill_matches_tempbalance(k):
    for evals in _spectra(3)[:4]:
        fit = fit_power_law(evals, estimator="hill", hill_k=k)
        reference = analysis_esd(torch.from_numpy(evals), "xmin_mid", xmin_pos=k)
        assert fit.xmin == np.sort(evals)[int(len(evals) / k)]
        assert fit.alpha == pytest.approx(reference, rel=1e-10)
        assert fit.num_pl_spikes == np.count_nonzero(evals >= fit.xmin)


def test_degenerate_inputs_give_a_status_not_an_exception():
    assert fit_power_law(np.zeros(50)).status == "fewer than 2 nonzero eigenvalues"
    assert fit_power_law(np.array([3.0])).status == "fewer than 2 nonzero eigenvalues"
    assert np.isnan(fit_power_law(np.array([1.0, np.nan, 2.0])).alpha)
    # The reference gives alpha = inf for an orthogonal matrix's flat spectrum.
    assert fit_power_law(np.full(30, 2.0)).status == "flat tail (alpha undefined)"
    with pytest.raises(ValueError, match="unknown estimator"):
        fit_power_law(np.ones(5), estimator="mle")


def test_small_n_fit_matches_weightwatcher_wwfit():
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(7)
    for size in (9, 12, 15, 19):
        for _ in range(5):
            evals = rng.pareto(1.5, size) + 0.1
            reference = ww_powerlaw.WWFit(evals)
            fit = fit_power_law(evals, small_n=True)
            assert fit.xmin == reference.xmin
            assert fit.alpha == pytest.approx(reference.alpha, rel=1e-10)
            assert fit.D == pytest.approx(reference.D, rel=1e-9)
    # At 20 eigenvalues and above the standard fit applies, with or without the option.
    evals = rng.pareto(1.5, 20) + 0.1
    assert fit_power_law(evals, small_n=True) == fit_power_law(evals)
    assert fit_power_law(evals).alpha == pytest.approx(ww_powerlaw.WWFit(evals).alpha)


def test_small_n_fit_uses_the_bias_corrected_estimator():
    evals = np.random.default_rng(3).pareto(1.5, 12) + 0.1
    plain = fit_power_law(evals)
    corrected = fit_power_law(evals, small_n=True)
    x = np.sort(evals)
    tail = x[x >= corrected.xmin]
    spread = np.sum(np.log(tail / corrected.xmin))
    assert corrected.alpha == pytest.approx(1 + (len(tail) - 1) / spread)
    assert len(tail) >= 8
    assert plain.alpha != corrected.alpha
