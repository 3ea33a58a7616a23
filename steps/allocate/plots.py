"""Plot a decisions table against depth."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from steps.allocate.errors import AllocationError  # noqa: E402

DECISIONS = ("sparsity", "lr_factor", "experts")


def plot_decisions(decisions: pa.Table, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG/PDF/SVG of the decision column versus block (or row order) to `path`."""
    column = next((c for c in DECISIONS if c in decisions.column_names), None)
    if column is None:
        raise AllocationError(f"decisions table has none of the columns {', '.join(DECISIONS)}")
    values = np.asarray(decisions[column].to_numpy(zero_copy_only=False), dtype=float)
    blocks = decisions["block"].to_pylist() if "block" in decisions.column_names else []
    by_block = bool(blocks) and None not in blocks
    depth = np.asarray(blocks, dtype=float) if by_block else np.arange(len(values), dtype=float)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.scatter(depth, values, s=12, alpha=0.6, label="layers")
    if by_block:
        # The line shows the per-block decision; layers of one block may differ when ungrouped.
        order = np.unique(depth)
        ax.plot(order, [values[depth == d].mean() for d in order], color="C1", label="block mean")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("block" if by_block else "layer (table order)")
    ax.set_ylabel(column)
    ax.set_title(title or column + " vs depth")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
