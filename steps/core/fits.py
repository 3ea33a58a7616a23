"""Power-law fits of an eigenvalue spectrum (ESD): alpha, xmin and the KS distance D.

All estimators share METHODS.md's formula: for a tail x_j >= xmin of size n (xmin
counted), alpha = 1 + n / sum_j ln(x_j / xmin). They differ in how xmin is chosen:

- ``ks`` (WeightWatcher 0.7.7, ``pl_package='ww'``): every eigenvalue but the
  largest is a candidate xmin; the one with the smallest KS distance
  D = max_k |1 - (x_k/xmin)^(1-alpha) - k/n| wins (first index on ties).
- ``alpha_peak`` (AlphaPruning / TempBalance ``xmin_peak`` / AlphaLoRA): like ``ks``
  with xmin restricted to [lower, 1.5 * peak], peak = 10^(left edge of the modal
  bin of a 100-bin histogram of log10 lambda). The reference code sets
  lower = log10(0.95 * peak), comparing a log with linear eigenvalues; this
  estimator reproduces that. ``alpha_peak_corrected`` uses lower = 0.95 * peak.
- ``hill`` (TempBalance ``xmin_mid``): xmin = x[int(n / k)] of the ascending sort.

Eigenvalues kept, as each reference runs: ``ks`` drops lambda <= 1e-5 (WeightWatcher's
``thresh``); ``alpha_peak``, ``alpha_peak_corrected`` and ``hill`` keep every eigenvalue
(AlphaPruning, TempBalance, AlphaLoRA and FARMS run with ``filter_zeros=False``): one
near-zero eigenvalue of a square matrix stretches the log histogram and moves
alpha_peak. Only numerical zeros (lambda <= lambda_max * n * eps of float64, the
eigensolver's noise floor, where the log is meaningless) are left out of those fits;
the references' SVD gives such eigenvalues arbitrary tiny values, and exact zeros
make their histogram fail.

The KS search is exact but avoids WeightWatcher's O(n^2) Python loop: alphas for
all candidates come from one reversed cumulative sum, and D is evaluated exactly
only for the candidates that a cheap lower bound (D on a coarse grid of the tail)
cannot rule out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVALS_THRESH = 1e-5  # ks: eigenvalues at or below this are treated as zero (WeightWatcher's)
SMALL_N_CUTOFF = 20  # WeightWatcher 0.7.7 switches to its small-N fit below this many evals
SMALL_N_MIN_TAIL = 8  # ... and only considers tails of at least this many evals
ESTIMATORS = ("ks", "alpha_peak", "alpha_peak_corrected", "hill")

_BLOCK_ELEMENTS = 1 << 20  # size of one dense (rows x tail) block in the exact D search
_GRID_COLUMNS = 128  # columns of the coarse grid that bounds D from below
_SEED_ROWS = 4  # candidates evaluated exactly first to get an upper bound on min D


@dataclass(frozen=True)
class PowerLawFit:
    """Result of one fit. ``status`` is "ok" or a short reason; on failure the
    numbers are NaN (and ``num_pl_spikes`` is 0)."""

    alpha: float
    xmin: float
    D: float
    sigma: float
    num_pl_spikes: int
    status: str = "ok"


def failed_fit(reason: str) -> PowerLawFit:
    nan = float("nan")
    return PowerLawFit(nan, nan, nan, nan, 0, reason)


def fit_power_law(
    evals: np.ndarray,
    *,
    estimator: str = "ks",
    hill_k: float = 2.0,
    small_n: bool = False,
) -> PowerLawFit:
    """Fit a power law to the tail of ``evals`` (any order, any length).

    ``small_n=True`` reproduces WeightWatcher 0.7.7's bias-corrected fit for
    spectra with fewer than 20 nonzero eigenvalues (``ks`` only). It is off by
    default so that every estimator uses METHODS.md's formula; turn it on to
    match WeightWatcher 0.7.7 exactly on such small layers.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    evals = np.asarray(evals, dtype=np.float64)
    if not np.all(np.isfinite(evals)):
        return failed_fit("non-finite eigenvalues")
    x = np.sort(evals[evals > zero_threshold(evals, estimator)])
    if len(x) < 2:
        return failed_fit("fewer than 2 nonzero eigenvalues")

    if estimator == "hill":
        fit = _fit_hill(x, hill_k)
    elif estimator == "ks" and small_n and len(x) < SMALL_N_CUTOFF:
        fit = _fit_small_n(x)
    else:
        candidates = np.ones(len(x) - 1, dtype=bool)
        if estimator != "ks":
            candidates = peak_candidates(x, corrected=estimator == "alpha_peak_corrected")
        fit = _fit_ks(x, candidates)
    if fit.status != "ok":
        return fit
    if not np.isfinite(fit.alpha):
        # All tail eigenvalues equal (e.g. an orthogonal matrix): the reference reports
        # alpha = inf; no power law describes such a tail.
        return failed_fit("flat tail (alpha undefined)")
    # Counted over all eigenvalues, as WeightWatcher does (xmin > threshold anyway).
    spikes = int(np.count_nonzero(evals >= fit.xmin))
    return PowerLawFit(fit.alpha, fit.xmin, fit.D, fit.sigma, spikes, fit.status)


def zero_threshold(evals: np.ndarray, estimator: str) -> float:
    """Eigenvalues at or below this are left out of the fit (see the module docstring)."""
    if estimator == "ks":
        return EVALS_THRESH
    if len(evals) == 0:
        return 0.0
    return float(max(evals.max(), 0.0) * len(evals) * np.finfo(np.float64).eps)


def tail_alphas(x: np.ndarray) -> np.ndarray:
    """alpha for every candidate xmin = x[i], i < n - 1, of the ascending array x."""
    logx = np.log(x)
    n_tail = len(x) - np.arange(len(x) - 1)
    sum_log_tail = np.cumsum(logx[::-1])[::-1][:-1]
    with np.errstate(divide="ignore"):  # a flat tail gives alpha = inf, as in the reference
        return 1.0 + n_tail / (sum_log_tail - n_tail * logx[:-1])


def ks_distances(x: np.ndarray, alphas: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact KS distance D for the candidate rows (ascending indices into x).

    D_i = max_{k < n_i} |1 - (x_{i+k}/x_i)^(1-alpha_i) - k/n_i|, n_i = len(x) - i;
    D_i = 1 when alpha_i <= 1. Evaluated as dense (rows x tail) blocks.
    """
    logx = np.log(x)
    out = np.ones(len(rows))
    per_block = max(1, _BLOCK_ELEMENTS // len(x))
    for start in range(0, len(rows), per_block):
        block = rows[start : start + per_block]
        cols = np.arange(block[0], len(x))
        out[start : start + len(block)] = _block_ks(logx, alphas, block, cols)
    return np.where(alphas[rows] > 1.0, out, 1.0)


def _block_ks(logx: np.ndarray, alphas: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """max over cols >= row of |theoretical - empirical CDF|, per row (0 if no such col)."""
    n_tail = (len(logx) - rows)[:, None].astype(np.float64)
    k = cols[None, :] - rows[:, None]
    dlog = logx[cols][None, :] - logx[rows][:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        # dlog == 0 (ties, the xmin itself) must give ratio^(1-alpha) = 1 even for alpha = inf.
        expo = np.where(dlog > 0, dlog * (1.0 - alphas[rows][:, None]), 0.0)
        dev = np.abs(1.0 - np.exp(expo) - k / n_tail)
    dev[k < 0] = 0.0
    return dev.max(axis=1)


def _fit_ks(x: np.ndarray, candidates: np.ndarray) -> PowerLawFit:
    """KS search over the candidate xmins (a mask over x[:-1]); non-candidates have D = 1."""
    alphas = tail_alphas(x)
    rows = np.flatnonzero(candidates & (alphas > 1.0))
    # With no candidate of alpha > 1 every D is 1 and the references' argmin takes index 0.
    best, best_d = _argmin_ks(x, alphas, rows) if len(rows) else (0, 1.0)
    if not candidates[best]:
        return failed_fit("no xmin candidate in the allowed range")
    return _make_fit(x, best, alphas[best], best_d)


def _argmin_ks(x: np.ndarray, alphas: np.ndarray, rows: np.ndarray) -> tuple[int, float]:
    """(index, D) of the smallest D among rows, first index on ties, without
    evaluating D exactly for rows whose grid lower bound already exceeds it."""
    survivors = rows
    if len(x) > 2 * _GRID_COLUMNS:
        lower = _grid_lower_bounds(x, alphas, rows)
        # Seeds: rows whose bound is low *and* tight (a long tail spans many grid columns).
        looseness = (len(x) // _GRID_COLUMNS) / (len(x) - rows)
        seeds = rows[np.sort(np.argsort(lower + looseness, kind="stable")[:_SEED_ROWS])]
        upper = ks_distances(x, alphas, seeds).min()
        # Rows whose bound is <= the best known D may still win (or tie): check them exactly.
        survivors = rows[lower <= upper]
    exact = ks_distances(x, alphas, survivors)
    i = int(np.argmin(exact))
    return int(survivors[i]), float(exact[i])


def _grid_lower_bounds(x: np.ndarray, alphas: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Lower bound on D for each row: the same maximum over a coarse column grid."""
    step = max(1, len(x) // _GRID_COLUMNS)
    logx = np.log(x)
    cols = np.arange(0, len(x), step)
    out = np.empty(len(rows))
    per_block = max(1, _BLOCK_ELEMENTS // len(cols))
    for start in range(0, len(rows), per_block):
        block = rows[start : start + per_block]
        out[start : start + len(block)] = _block_ks(logx, alphas, block, cols)
    return out


def _make_fit(x: np.ndarray, i: int, alpha: float, d: float) -> PowerLawFit:
    n_tail = len(x) - i
    sigma = (alpha - 1.0) / np.sqrt(n_tail)
    return PowerLawFit(float(alpha), float(x[i]), float(d), float(sigma), n_tail)


def peak_candidates(x: np.ndarray, *, corrected: bool) -> np.ndarray:
    """Mask over x[:-1] of the xmins that ``alpha_peak`` may choose.

    peak = 10^(left edge of the modal bin of a 100-bin histogram of log10 x);
    upper bound 1.5 * peak; lower bound log10(0.95 * peak) as in the reference
    code (a log value compared with eigenvalues) or 0.95 * peak when corrected.
    """
    counts, edges = np.histogram(np.log10(x), bins=100)
    peak = 10.0 ** edges[np.argmax(counts)]
    lower = 0.95 * peak if corrected else np.log10(0.95 * peak)
    xmins = x[:-1]
    # The reference loop breaks at the first xmin above the upper bound; x is sorted,
    # so that is the same as the mask.
    return (xmins >= lower) & (xmins <= 1.5 * peak)


def _fit_hill(x: np.ndarray, k: float) -> PowerLawFit:
    """TempBalance's ``xmin_mid``: xmin = x[int(n / k)], D reported for that xmin."""
    if k < 1.0:
        raise ValueError(f"hill_k must be >= 1, got {k}")
    i = int(len(x) / k)
    if i >= len(x) - 1:
        return failed_fit("hill tail has fewer than 2 eigenvalues")
    alphas = np.full(len(x) - 1, np.nan)
    alphas[i] = tail_alphas(x[i:])[0]
    d = ks_distances(x, alphas, np.array([i]))[0]
    return _make_fit(x, i, alphas[i], d)


def _fit_small_n(x: np.ndarray) -> PowerLawFit:
    """WeightWatcher 0.7.7's small-N fit (``WWFit`` with fewer than 20 eigenvalues).

    alpha = 1 + (n - 1) / sum ln(x_j / xmin) (bias-corrected MLE), tails of at least
    8 eigenvalues only. Its ``fit_powerlaw_smallN`` ranks xmins by
    J = D - 0.868 / sqrt(n), but ``WWFit.__init__`` then re-selects by argmin D, so
    the xmin reported (and reproduced here) is the one with the smallest D.
    """
    logx = np.log(x)
    n_tail = (len(x) - np.arange(len(x) - 1)).astype(np.float64)
    spread = np.cumsum(logx[::-1])[::-1][:-1] - n_tail * logx[:-1]
    candidates = (n_tail >= SMALL_N_MIN_TAIL) & (spread > 1e-12)
    alphas = np.zeros(len(x) - 1)
    alphas[candidates] = 1.0 + (n_tail[candidates] - 1.0) / spread[candidates]
    if not candidates.any():
        # Reference fallback: the whole spectrum is the tail.
        if spread[0] <= 1e-12:
            return failed_fit("degenerate spectrum (all eigenvalues equal)")
        candidates[0] = True
        alphas[0] = 1.0 + (len(x) - 1.0) / spread[0]
    rows = np.flatnonzero(candidates)
    d = ks_distances(x, alphas, rows)
    best = int(np.argmin(d))
    return _make_fit(x, int(rows[best]), alphas[rows[best]], d[best])
