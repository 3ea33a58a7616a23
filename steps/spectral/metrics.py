"""Per-matrix HT-SR metrics from an ESD and its power-law fit.

Column names follow WeightWatcher where it has them (see METHODS.md section 1). Beside
``alpha`` (the chosen estimator's), every row has each consumer's paper's alpha.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from steps.core.esd import Spectrum
from steps.core.farms import FarmsOptions, FarmsSpectra
from steps.core.fits import EVALS_THRESH, PowerLawFit
from steps.core.naming import block_of

OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0
_ENTROPY_EPSILON = 1e-10  # WeightWatcher's smoothing in matrix_entropy

# column -> (estimator, hill_k): the alphas the papers' consumers read (METHODS.md section 1).
ALPHA_COLUMNS = {
    "alpha_peak": ("alpha_peak", 2.0),  # AlphaPruning, AlphaLoRA
    "alpha_hill": ("hill", 2.0),  # TempBalance
    "alpha_hill_k1.5": ("hill", 1.5),  # TB_Sigmoid
}
_KEPT_ALL = "every eigenvalue but numerical zeros (filter_zeros=False)"
_ESTIMATOR_NOTES = {
    "ks": f"ks: KS-optimal xmin over all eigenvalues (WeightWatcher); lambda <= {EVALS_THRESH} "
    "dropped",
    "alpha_peak": "alpha_peak: KS-optimal xmin <= 1.5 x the log-histogram peak (AlphaPruning "
    f"lib/esd_utils.py xmin_peak, its lower-bound quirk kept); {_KEPT_ALL}",
    "alpha_peak_corrected": "alpha_peak_corrected: xmin in [0.95, 1.5] x the log-histogram "
    f"peak; {_KEPT_ALL}",
    "hill": "hill: xmin = lambda[int(n / k)] of the ascending sort (TempBalance 'median' / "
    f"xmin_mid); {_KEPT_ALL}",
}

SCHEMA = pa.schema(
    [
        ("layer_id", pa.int64()),
        ("name", pa.string()),
        ("slice_id", pa.int64()),
        ("layer_type", pa.string()),
        ("block", pa.int64()),
        ("N", pa.int64()),
        ("M", pa.int64()),
        ("rf", pa.int64()),
        ("num_params", pa.int64()),
        ("num_evals", pa.int64()),
        ("lambda_max", pa.float64()),
        ("spectral_norm", pa.float64()),
        ("alpha", pa.float64()),
        ("xmin", pa.float64()),
        ("D", pa.float64()),
        ("sigma", pa.float64()),
        ("num_pl_spikes", pa.int64()),
        ("norm", pa.float64()),
        ("log_norm", pa.float64()),
        ("log_spectral_norm", pa.float64()),
        ("alpha_weighted", pa.float64()),
        ("log_alpha_norm", pa.float64()),
        ("stable_rank", pa.float64()),
        ("matrix_rank", pa.int64()),
        ("entropy", pa.float64()),
        ("warning", pa.string()),
        ("status", pa.string()),
        *[(column, pa.float64()) for column in ALPHA_COLUMNS],
    ]
)
FARMS_SCHEMA = pa.schema(
    [
        ("alpha_peak_farms", pa.float64()),
        ("farms_rows", pa.int64()),
        ("farms_cols", pa.int64()),
        ("farms_windows", pa.int64()),
        ("farms_capped", pa.bool_()),
    ]
)


def alpha_notes(
    estimator: str, hill_k: float, small_n: bool, farms: FarmsOptions | None
) -> dict[str, str]:
    """How each alpha column was made (stored in the table's metadata)."""
    alpha = _ESTIMATOR_NOTES[estimator]
    if estimator == "hill":
        alpha += f"; k = {hill_k}"
    if small_n and estimator == "ks":
        alpha += "; WeightWatcher 0.7.7 small-N fit below 20 eigenvalues"
    notes = {"alpha": alpha + " (the --estimator)"}
    for column, (name, k) in ALPHA_COLUMNS.items():
        notes[column] = _ESTIMATOR_NOTES[name] + (f"; k = {k}" if name == "hill" else "")
    if farms is not None:
        notes["alpha_peak_farms"] = (
            f"FARMS (HUST-AI-HYZ/FARMS fixed_sampling + analysis_esd xmin_peak): windows of "
            f"min({farms.window}, rows, cols) rows x q = {farms.q}, at most {farms.ops} x "
            f"{farms.ops} positions, ESDs pooled and fitted by alpha_peak ({_KEPT_ALL}); conv: "
            "one window per kernel slice and row band, mean alpha over bands"
        )
    return notes


def farms_columns(farms: FarmsSpectra | None, alpha: float) -> dict:
    """The FARMS columns of a row (nulls when the matrix could not be measured)."""
    if farms is None:
        return {"alpha_peak_farms": float("nan"), "farms_rows": None, "farms_cols": None,
                "farms_windows": None, "farms_capped": None}  # fmt: skip
    return {"alpha_peak_farms": alpha, "farms_rows": farms.rows, "farms_cols": farms.cols,
            "farms_windows": farms.windows, "farms_capped": farms.capped}  # fmt: skip


def training_warning(alpha: float) -> str:
    if alpha < OVER_TRAINED_ALPHA:
        return "over-trained"
    if alpha > UNDER_TRAINED_ALPHA:
        return "under-trained"
    return ""


def matrix_rank(evals: np.ndarray) -> int:
    """numpy.linalg.matrix_rank of the Gram matrix whose eigenvalues these are.

    WeightWatcher thresholds the singular values at sigma_max * N * eps; eigenvalues
    of a float64 Gram matrix are only accurate to about lambda_max * M * eps, so that
    is the threshold here. Both agree on full-rank matrices.
    """
    if len(evals) == 0 or evals[-1] <= 0:
        return 0
    tolerance = evals[-1] * len(evals) * np.finfo(np.float64).eps
    return int(np.count_nonzero(evals > tolerance))


def spectral_entropy(evals: np.ndarray, rank: int) -> float:
    """Normalised spectral entropy, as WeightWatcher's matrix_entropy."""
    total = evals.sum()
    if total <= 0:
        return float("nan")
    p = evals / total + _ENTROPY_EPSILON
    return float(-np.sum(p * np.log(p)) / np.log(rank + _ENTROPY_EPSILON))


def metrics_row(
    *,
    layer_id: int,
    name: str,
    layer_type: str,
    num_params: int,
    spectrum: Spectrum,
    fit: PowerLawFit,
    alphas: dict[str, float],
) -> dict:
    """One row of the metrics table (keys = SCHEMA's names); ``alphas`` by ALPHA_COLUMNS."""
    evals = spectrum.evals
    row = {
        "layer_id": layer_id,
        "name": name,
        "slice_id": spectrum.slice_id,
        "layer_type": layer_type,
        "block": block_of(name),
        "N": spectrum.N,
        "M": spectrum.M,
        "rf": spectrum.num_slices,
        "num_params": num_params,
        "num_evals": len(evals) if spectrum.status == "ok" else spectrum.M * spectrum.num_slices,
    }
    nan = float("nan")
    norm_metrics = dict.fromkeys(
        ["lambda_max", "spectral_norm", "norm", "log_norm", "log_spectral_norm", "stable_rank",
         "entropy", "alpha_weighted", "log_alpha_norm"],
        nan,
    )  # fmt: skip
    norm_metrics["matrix_rank"] = 0
    status = spectrum.status
    if status == "ok":
        norm_metrics.update(_norm_metrics(evals))
        if norm_metrics["norm"] == 0:
            status = "zero matrix"
        elif fit.status != "ok":
            status = f"fit failed: {fit.status}"
        else:
            norm_metrics["alpha_weighted"] = fit.alpha * norm_metrics["log_spectral_norm"]
            norm_metrics["log_alpha_norm"] = _log_alpha_norm(evals, fit.alpha)
    row.update(norm_metrics)
    row.update(
        alpha=fit.alpha,
        xmin=fit.xmin,
        D=fit.D,
        sigma=fit.sigma,
        num_pl_spikes=fit.num_pl_spikes,
        warning=training_warning(fit.alpha) if fit.status == "ok" else "",
        status=status,
    )
    row.update(alphas)
    return row


def _norm_metrics(evals: np.ndarray) -> dict:
    lambda_max = float(evals[-1]) if len(evals) else 0.0
    norm = float(evals.sum())
    rank = matrix_rank(evals)
    if norm == 0:
        return {"lambda_max": 0.0, "spectral_norm": 0.0, "norm": 0.0, "matrix_rank": 0}
    return {
        "lambda_max": lambda_max,
        "spectral_norm": lambda_max,
        "norm": norm,
        "log_norm": float(np.log10(norm)),
        "log_spectral_norm": float(np.log10(lambda_max)),
        "stable_rank": norm / lambda_max,
        "matrix_rank": rank,
        "entropy": spectral_entropy(evals, rank),
    }


def _log_alpha_norm(evals: np.ndarray, alpha: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.log10(np.sum(evals**alpha)))


def summarize(metrics: pa.Table) -> dict:
    """Model-level summary: mean alpha and alpha_weighted over fitted rows, and counts."""
    rows = metrics.to_pylist()
    fitted = [r for r in rows if r["status"] == "ok"]
    alphas = np.array([r["alpha"] for r in fitted])
    weighted = np.array([r["alpha_weighted"] for r in fitted])
    return {
        "num_matrices": len(rows),
        "num_fitted": len(fitted),
        "mean_alpha": float(alphas.mean()) if len(fitted) else float("nan"),
        "mean_alpha_weighted": float(weighted.mean()) if len(fitted) else float("nan"),
        "num_over_trained": int(np.count_nonzero(alphas < OVER_TRAINED_ALPHA)),
        "num_under_trained": int(np.count_nonzero(alphas > UNDER_TRAINED_ALPHA)),
    }
