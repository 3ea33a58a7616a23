"""Plots of the spectral metrics (matplotlib, Agg backend: files only, no display).

    paths = write_plots(metrics, esd, "plots/")

- alpha_vs_depth.png: alpha and alpha_weighted per matrix in model order, coloured
  by matrix kind (the name without its block prefix), guide lines at alpha 2 and 6;
- esd_worst.png / esd_best.png: log-log ESD with the fitted power-law tail, for
  the matrix with the highest alpha (worst) and the lowest alpha >= 2 (best; the
  lowest alpha overall when none is >= 2).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from steps.spectral.metrics import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA  # noqa: E402
from steps.spectral.report import esd_density, fitted_tail  # noqa: E402

_BLOCK_PREFIX = re.compile(r"^.*?(?:^|\.)(?:layers?|h|blocks?)\.\d+\.|^.*?(?:^|\.)layer\d+\.")
_MAX_KINDS = 12  # more colours than this are unreadable; the rest are "other"


def write_plots(metrics: pa.Table, esd: pa.Table | None, directory: str | Path) -> list[Path]:
    """Write every plot that the inputs allow; return the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [plot_alpha_vs_depth(metrics, directory / "alpha_vs_depth.png")]
    if esd is not None:
        paths += plot_best_and_worst_esd(metrics, esd, directory)
    return paths


def matrix_kind(name: str) -> str:
    """Name without its block prefix: model.layers.3.self_attn.q_proj -> self_attn.q_proj."""
    return _BLOCK_PREFIX.sub("", name)


def plot_alpha_vs_depth(metrics: pa.Table, path: str | Path) -> Path:
    """alpha (top) and alpha_weighted (bottom) against the matrix's position in the model."""
    rows = _fitted_rows(metrics)
    kinds = [matrix_kind(r["name"]) for r in rows]
    common = sorted(set(kinds), key=lambda k: (-kinds.count(k), k))[:_MAX_KINDS]
    kinds = [k if k in common else "other" for k in kinds]
    depth = np.arange(len(rows))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for kind in dict.fromkeys(kinds):
        mask = np.array([k == kind for k in kinds])
        for ax, column in ((top, "alpha"), (bottom, "alpha_weighted")):
            values = np.array([r[column] for r in rows])
            ax.scatter(depth[mask], values[mask], s=18, label=kind)
    for guide in (OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA):
        top.axhline(guide, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("alpha")
    bottom.set_ylabel("alpha_weighted")
    bottom.set_xlabel("matrix (model order)")
    top.set_title("Power-law exponent per weight matrix (2 = over-trained, 6 = under-trained)")
    top.legend(fontsize=7, ncol=3, loc="upper left")
    return _save(fig, path)


def plot_best_and_worst_esd(metrics: pa.Table, esd: pa.Table, directory: Path) -> list[Path]:
    rows = _fitted_rows(metrics)
    if not rows:
        return []
    worst = max(rows, key=lambda r: r["alpha"])
    trained = [r for r in rows if r["alpha"] >= OVER_TRAINED_ALPHA] or rows
    best = min(trained, key=lambda r: r["alpha"])
    evals_by_key = {(r["layer_id"], r["slice_id"]): np.asarray(r["evals"]) for r in esd.to_pylist()}
    paths = []
    for label, row in (("worst", worst), ("best", best)):
        evals = evals_by_key[(row["layer_id"], row["slice_id"])]
        paths.append(plot_esd_fit(evals, row, directory / f"esd_{label}.png", label))
    return paths


def plot_esd_fit(evals: np.ndarray, row: dict, path: str | Path, label: str = "") -> Path:
    """Log-log histogram density of the ESD with the fitted tail p(x) ~ x^-alpha."""
    positive = evals[evals > 0]
    centres, density = esd_density(positive, 59)
    alpha, xmin = row["alpha"], row["xmin"]
    # The fitted pdf is a straight line in log-log: its two ends (report.fitted_tail).
    x, fitted = 10.0 ** np.array(fitted_tail(row, len(positive), positive.max())).T

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(centres, density, "o", markersize=3, label="ESD")
    ax.loglog(x, fitted, "r--", label=f"fit alpha = {alpha:.2f}")
    ax.axvline(xmin, color="grey", linestyle=":", label=f"xmin = {xmin:.3g}")
    ax.set_xlabel("eigenvalue of W^T W")
    ax.set_ylabel("density")
    ax.set_title(f"{label} {row['name']}".strip(), fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fitted_rows(metrics: pa.Table) -> list[dict]:
    return [r for r in metrics.to_pylist() if r["status"] == "ok" and np.isfinite(r["alpha"])]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
