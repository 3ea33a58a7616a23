"""Correlation traps: the ESD of an element-wise shuffled copy of each matrix (WeightWatcher
0.7.7's ``randomize=True``).

Shuffling the entries of W destroys every correlation between them and leaves their
distribution, so the shuffled ESD should be a Marchenko-Pastur bulk. Eigenvalues of the
shuffled matrix beyond the bulk edge (``num_traps``) come from a few very large entries: a
"correlation trap" that training left in the layer. The columns, as WeightWatcher defines them:

- ``lambda_max_rand``: the largest shuffled eigenvalue (WeightWatcher's ``max_rand_eval``),
  pooled over 5 shuffles when the matrix has fewer than 100 eigenvalues;
- ``num_traps``: shuffled eigenvalues above the fitted MP edge plus the Tracy-Widom margin
  (``mp_fit`` on those shuffled eigenvalues, rescaled to mean 1: sigma by a brute-force
  least-squares fit of the MP density to a linear-kernel KDE of bandwidth 0.1, polished by
  Nelder-Mead; edge (sigma (1 + 1/sqrt(Q)))^2 + sqrt(Q^-1/2 edge^(2/3) M^(-2/3)));
- ``rand_distance``: Jensen-Shannon distance between the sorted eigenvalue vectors of W and
  of one more shuffle, each vector normalised to sum 1.

Shuffles are seeded (a numpy RandomState drawn in WeightWatcher's order: the replicas, then
the one for the distance), and shuffle what WeightWatcher shuffles: a 2-D matrix as stored,
each conv kernel slice as an N x M matrix (N >= M).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import optimize, stats
from threadpoolctl import threadpool_limits

from steps.core.esd import compute_spectra

TRAP_COLUMNS = ("lambda_max_rand", "num_traps", "rand_distance")
REPLICAS_BELOW = 100  # fewer eigenvalues than this: pool 5 shuffles (WeightWatcher's hack)
REPLICAS = 5
KDE_BANDWIDTH = 0.1
KDE_POINTS = 1000
DENSITY_FLOOR = 0.01  # KDE points below this density are left out of the MP fit
OUT_OF_RANGE = 1000.0  # residual of a sigma whose MP support does not fit the KDE


def correlation_traps(tensor: torch.Tensor, layer_type: str, evals: np.ndarray, n: int, m: int,
                      rng: np.random.RandomState) -> dict[str, float | int]:
    """The trap columns of one weight tensor whose (pooled) ESD is `evals`; n >= m are the
    sides of one matrix (or kernel slice)."""
    replicas = REPLICAS if evals.size < REPLICAS_BELOW else 1
    pooled = np.sort(np.concatenate([shuffled_evals(tensor, layer_type, rng)
                                     for _ in range(replicas)]))
    distance_evals = shuffled_evals(tensor, layer_type, rng)
    return {"lambda_max_rand": float(pooled[-1]),
            "num_traps": mp_spikes(pooled, n, m),
            "rand_distance": jensen_shannon_distance(evals, distance_evals)}


def shuffled_evals(tensor: torch.Tensor, layer_type: str, rng: np.random.RandomState
                   ) -> np.ndarray:
    """ESD (ascending, scaled like the layer's own) of an element-wise shuffled copy."""
    return compute_spectra(shuffled(tensor, rng), layer_type)[0].evals


def shuffled(tensor: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
    """A copy with the entries shuffled: a matrix as a whole, a conv tensor slice by slice
    (each slice N x M, N >= M, flattened row-major) in kernel order, as WeightWatcher does."""
    array = tensor.detach().to("cpu", torch.float64).numpy()
    if array.ndim == 2:
        flat = array.flatten()
        rng.shuffle(flat)
        return torch.from_numpy(flat.reshape(array.shape))
    out = np.empty_like(array)
    kernel = np.ndindex(*array.shape[2:])
    for position in kernel:
        index = (slice(None), slice(None), *position)
        matrix = array[index]
        tall = matrix.shape[0] < matrix.shape[1]
        flat = (matrix.T if tall else matrix).flatten()
        rng.shuffle(flat)
        shaped = flat.reshape(matrix.T.shape if tall else matrix.shape)
        out[index] = shaped.T if tall else shaped
    return torch.from_numpy(out)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt of the JS divergence of two equal-length non-negative vectors (each normalised)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    middle = (p + q) / 2
    return float(np.sqrt((stats.entropy(p, middle) + stats.entropy(q, middle)) / 2))


def mp_spikes(evals: np.ndarray, n: int, m: int) -> int:
    """Eigenvalues above the fitted Marchenko-Pastur edge plus the Tracy-Widom margin."""
    q = n / m
    scaled = evals * (evals.size / evals.sum())  # mean 1, as WeightWatcher rescales
    sigma = fit_mp_sigma(scaled, q)
    edge = (sigma * (1 + 1 / np.sqrt(q))) ** 2
    tracy_widom = 1 / np.sqrt(q) * edge ** (2 / 3) * m ** (-2 / 3)
    return int(np.count_nonzero(scaled > edge + np.sqrt(tracy_widom)))


def fit_mp_sigma(evals: np.ndarray, q: float) -> float:
    """sigma of the MP (q > 1) or quarter-circle (q = 1, on singular values) density closest
    to the KDE of the eigenvalues: a grid over [0.05, 2) x the sigma of the largest
    eigenvalue, then Nelder-Mead from the grid's best."""
    scale = np.sqrt(evals.max() / (1 + 1 / np.sqrt(q)) ** 2)
    values = np.sqrt(evals) if q == 1 else evals
    grid, density, dropped = kde_on_grid(values)
    peak = grid[np.argmax(density)]

    def squared_residual(params: np.ndarray) -> float:
        sigma = params[0] if np.ndim(params) else params
        resid = _residual(sigma, grid, density, q, peak)
        return float(np.sum(resid**2)) + 0.0 * dropped  # the dropped points' residual is 0

    best = optimize.brute(squared_residual, (slice(0.05 * scale, 2.0 * scale, 0.01 * scale),),
                          full_output=True)
    return float(best[0][0])


def _residual(sigma: float, grid: np.ndarray, density: np.ndarray, q: float,
              peak: float) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if q == 1:
            law = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - grid**2))
            return law - density
        low, high = (sigma * (1 - np.sqrt(1 / q))) ** 2, (sigma * (1 + np.sqrt(1 / q))) ** 2
        if high < peak or high > grid.max() or low > peak:
            return np.full(density.size, OUT_OF_RANGE)
        law = np.nan_to_num(1 / (2 * np.pi * sigma * sigma * grid / q)
                            * np.sqrt((high - grid) * (grid - low)))
        return law - density


def kde_on_grid(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Linear-kernel KDE (bandwidth 0.1) on 1000 points over [0, max + 0.5], keeping the
    points with density above 0.01; also how many fell below it."""
    grid = np.linspace(0, values.max() + 0.5, KDE_POINTS)
    density = linear_kde(np.sort(values), grid, KDE_BANDWIDTH)
    keep = density > DENSITY_FLOOR
    return grid[keep], density[keep], int(np.count_nonzero(density < DENSITY_FLOOR))


def linear_kde(sorted_values: np.ndarray, points: np.ndarray, bandwidth: float) -> np.ndarray:
    """(1 / n h) sum_i max(0, 1 - |x - v_i| / h) at every point x, with prefix sums over
    the sorted values (exact, O((n + points) log n))."""
    sums = np.concatenate([[0.0], np.cumsum(sorted_values)])
    lo = np.searchsorted(sorted_values, points - bandwidth, side="right")
    mid = np.searchsorted(sorted_values, points, side="right")
    hi = np.searchsorted(sorted_values, points + bandwidth, side="left")
    left = (mid - lo) * points - (sums[mid] - sums[lo])  # sum of x - v over v in (x - h, x]
    right = (sums[hi] - sums[mid]) - (hi - mid) * points  # sum of v - x over v in (x, x + h)
    kernel = (hi - lo) - (left + right) / bandwidth
    return np.clip(kernel, 0.0, None) / (sorted_values.size * bandwidth)


def append_trap_columns(metrics, source, selected: list, evals: list[np.ndarray],
                        seed: int = 0):
    """The metrics table with the trap columns, one RandomState(seed) drawn through the
    matrices in model order (rows with a failed ESD get nulls)."""
    import pyarrow as pa

    rng = np.random.RandomState(seed)
    by_name = {info.name: info for info in selected}
    columns: dict[str, list] = {name: [] for name in TRAP_COLUMNS}
    # Single-threaded BLAS, as the spectral pass runs: threaded LAPACK on these small Gram
    # matrices is slower, and much slower on a busy machine.
    with threadpool_limits(limits=1):
        for row, row_evals in zip(metrics.to_pylist(), evals, strict=True):
            info = by_name[row["name"]]
            traps = (correlation_traps(source.load(info), info.layer_type, row_evals,
                                       row["N"], row["M"], rng)
                     if row["status"] == "ok" else dict.fromkeys(TRAP_COLUMNS))
            for name in TRAP_COLUMNS:
                columns[name].append(traps[name])
    types = {"lambda_max_rand": pa.float64(), "num_traps": pa.int64(),
             "rand_distance": pa.float64()}
    for name in TRAP_COLUMNS:
        metrics = metrics.append_column(pa.field(name, types[name]),
                                        pa.array(columns[name], types[name]))
    return metrics
