"""Heatmaps of TempBalance over training: alpha and lr factor per layer and epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

__all__ = ["plot_history", "write_heatmap"]


def plot_history(history: pa.Table, out_dir: Path) -> list[Path]:
    """alpha.png and lr_factor.png from the long history table; [] without layer rows."""
    rows = [r for r in history.to_pylist() if r["layer"] is not None]
    if not rows:
        return []
    epochs = sorted({r["epoch"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))  # model order
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for column, title, cmap in (("alpha", "hill alpha", "viridis"),
                                ("lr_factor", "lr factor (lr / global lr)", "coolwarm")):
        grid = np.full((len(layers), len(epochs)), np.nan)
        for r in rows:
            value = r[column]
            grid[layers.index(r["layer"]), epochs.index(r["epoch"])] = (
                np.nan if value is None else value)
        paths.append(write_heatmap(grid, layers, epochs, title, out_dir / f"{column}.png", cmap))
    return paths


def write_heatmap(grid: np.ndarray, layers: list[str], epochs: list[int], title: str,
                  path: Path, cmap: str) -> Path:
    """One layer x epoch heatmap, layers top (first) to bottom (last)."""
    height = min(14.0, 1.5 + 0.16 * len(layers))
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * len(epochs), height))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    step = max(1, len(layers) // 40)  # at most ~40 labels stay readable
    ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=6)
    ax.set_xlabel("epoch (0 = initial weights)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
