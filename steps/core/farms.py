"""FARMS: ESDs of fixed-aspect-ratio windows of a weight matrix (Hu et al., ICML 2025).

The reference code (HUST-AI-HYZ/FARMS, ``sampling.fixed_sampling`` and the Conv2d branch
of ``net_esd_estimator_farms``) measures alpha on windows of one shape instead of the
whole matrix, which removes the aspect-ratio bias of alpha:

- a matrix (rows x cols, as stored: out x in) gets windows of r = min(window, rows, cols)
  rows and c = int(r * q) columns on a grid of at most ops x ops positions (row step
  max(1, (rows - r) // (ops - 1)), start min(i * step, rows - r); columns likewise); the
  squared singular values of every window are pooled into one ESD. The reference caps r
  at the smaller side; c is capped at cols too (the reference would slice from a
  negative start there);
- a conv tensor is cut into kernel slices W[:, :, i, j] (transposed so rows >= cols);
  with q <= 1 a window is cols x int(cols // (1 / q)), with q > 1 int(cols // q) x cols;
  window d of each slice covers rows d * nr .. (d + 1) * nr for d < rows // cols. The
  slices' windows of one d are pooled into one ESD (Conv2d eigenvalues scaled by 0.5),
  and the reference averages the alphas of these ESDs. ``window`` and ``ops`` do not
  apply to conv tensors (nor in the reference).

Every window has the same shape, so the eigenvalues come from one batched float64
eigensolve of the windows' Gram matrices (of the smaller side), on the GPU when one is
given; on the CPU the windows are split over torch's threads, one single-threaded LAPACK
call each (the windows are independent, while one eigensolve scales poorly over cores).
Overlapping windows at one row position are diagonal blocks of one Gram of their
rows, and Grams slide down the matrix by the rows that leave and enter them, so a row
is multiplied about once per column group, not once per window.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from steps.core.esd import eigenvalue_scale, kernel_slices
from steps.core.fits import fit_power_law

DEFAULT_WINDOW = 2000  # num_row_samples of the reference's LLM runs
DEFAULT_Q = 1.0  # Q_ratio
DEFAULT_OPS = 10  # sampling_ops_per_dim (the LLaMA-7B/13B alphas shipped use 10 and 15)
_CHUNK_BYTES = {"cpu": 1 << 26, "gpu": 1 << 30}  # float64 Grams solved in one batched call


@dataclass(frozen=True)
class FarmsOptions:
    """FARMS settings: window rows, aspect ratio q = columns / rows, positions per side."""

    window: int = DEFAULT_WINDOW
    q: float = DEFAULT_Q
    ops: int = DEFAULT_OPS

    def problem(self) -> str:
        """Why these options cannot run ('' when they can)."""
        if self.window < 1:
            return f"FARMS window {self.window} must be at least 1 row"
        if not self.q > 0:
            return f"FARMS q {self.q} must be > 0"
        if self.ops < 2:
            return f"FARMS ops {self.ops} must be >= 2 (window positions per side)"
        return ""


# The reference's TempBalance + FARMS image-classification runs (Image_Classification,
# bash_scripts/config/farms_imagecls_main.txt: num_row_samples 100, Q_ratio 1.0,
# sampling_ops_per_dim 9; Conv2d by the conv branch, where window and ops do not apply).
# Its fixed_sampling there does not cap a window larger than the matrix (it slices from a
# negative start: fewer rows); tailwise caps it at the smaller side, as the LLM code does.
IMAGE_CLASSIFICATION_OPTIONS = FarmsOptions(window=100, q=1.0, ops=9)


@dataclass(frozen=True)
class FarmsSpectra:
    """The pooled ESDs of one tensor's windows (one per conv row band, else one)."""

    groups: list[np.ndarray]  # ascending eigenvalues; alpha = mean of the groups' alphas
    rows: int  # window shape
    cols: int
    windows: int
    capped: bool  # the window was cut down to fit the matrix

    def alpha(self, estimator: str = "alpha_peak", hill_k: float = 2.0) -> float:
        """The FARMS alpha: the mean of the groups' fitted alphas, as the reference."""
        fits = [fit_power_law(g, estimator=estimator, hill_k=hill_k) for g in self.groups]
        return float(np.mean([fit.alpha for fit in fits]))


def window_starts(size: int, length: int, ops: int) -> list[int]:
    """Start offsets of at most ``ops`` windows of ``length`` along a side of ``size``."""
    step = max(1, (size - length) // (ops - 1))
    count = min(ops, max(1, (size - length) // step + 1))
    return [min(i * step, size - length) for i in range(count)]


def farms_spectra(
    tensor: torch.Tensor, layer_type: str, options: FarmsOptions, *, device: str = "cpu"
) -> FarmsSpectra:
    """The FARMS ESDs of a 2-D matrix (out, in) or a conv tensor (out, in, k...)."""
    if options.problem():
        raise ValueError(options.problem())
    if tensor.ndim == 2:
        return _matrix_spectra(tensor, options, device)
    return _conv_spectra(tensor, layer_type, options.q, device)


def _matrix_spectra(matrix: torch.Tensor, options: FarmsOptions, device: str) -> FarmsSpectra:
    rows, cols = matrix.shape
    r = min(options.window, rows, cols)
    c = int(r * options.q)
    capped = r < options.window or c > cols
    c = min(c, cols)
    if c < 1:
        raise ValueError(f"FARMS window {r} x int({r} * q={options.q}) has no column")
    row_starts = window_starts(rows, r, options.ops)
    col_starts = window_starts(cols, c, options.ops)
    grams = _sliding_grams(matrix.to(device), r, c, row_starts, col_starts)
    evals = solve_grams(grams, device)
    return FarmsSpectra([np.sort(evals.ravel())], r, c, len(evals), capped)


def _sliding_grams(
    matrix: torch.Tensor, r: int, c: int, row_starts: list[int], col_starts: list[int]
) -> Iterator[torch.Tensor]:
    """Gram matrices (of the smaller side) of the windows matrix[a:a+r, b:b+c], float64.

    Each column group's Gram is updated from one row position to the next by the rows
    that leave and enter it, so overlapping row slabs cost only their new rows; the
    windows of a group are diagonal blocks of its Gram.
    """
    # The Gram is of the smaller window side, and (for square windows) the slab slides
    # along the side with more window positions: otherwise work on the transpose.
    if c > r or (c == r and len(col_starts) > len(row_starts)):
        matrix, r, c, row_starts, col_starts = matrix.t(), c, r, col_starts, row_starts
    groups = _column_groups(col_starts, c)
    grams: list[torch.Tensor | None] = [None] * len(groups)
    top = 0
    for a in row_starts:
        for g, (left, right, starts) in enumerate(groups):
            block = matrix[:, left:right]
            if grams[g] is None or a - top >= r:
                grams[g] = _rows_gram(block, a, a + r)
            else:  # a new tensor: the blocks already yielded keep their values
                grams[g] = grams[g] - _rows_gram(block, top, a) + _rows_gram(block, top + r, a + r)
            for b in starts:
                yield grams[g][b - left : b - left + c, b - left : b - left + c]
        top = a


def _column_groups(col_starts: list[int], c: int) -> list[tuple[int, int, list[int]]]:
    """(left, right, starts): one Gram over the span of all column windows when that is
    cheaper than one Gram per window (heavily overlapping windows), else one each."""
    left, right = min(col_starts), max(col_starts) + c
    if (right - left) ** 2 <= len(col_starts) * c * c:
        return [(left, right, col_starts)]
    return [(b, b + c, [b]) for b in col_starts]


def _rows_gram(block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    rows = block[start:stop].to(torch.float64)
    return rows.t() @ rows


def _conv_spectra(tensor: torch.Tensor, layer_type: str, q: float, device: str) -> FarmsSpectra:
    slices = kernel_slices(tensor)
    if slices.shape[1] < slices.shape[2]:
        slices = slices.transpose(1, 2)
    count, rows, cols = slices.shape
    if q > 1:
        nr, nc = max(1, int(cols // q)), cols
    else:
        nr, nc = cols, max(1, int(cols // (1 / q)))
    bands = rows // cols
    windows = slices.to(device)[:, : bands * nr, :nc].reshape(count, bands, nr, nc)
    grams = (_gram(w.to(torch.float64)) for band in windows.unbind(1) for w in band)
    evals = solve_grams(grams, device) * eigenvalue_scale(layer_type, count, per_slice=False)
    groups = [np.sort(band.ravel()) for band in evals.reshape(bands, count, -1)]
    return FarmsSpectra(groups, nr, nc, bands * count, capped=False)


def _gram(window: torch.Tensor) -> torch.Tensor:
    return window.t() @ window if window.shape[0] >= window.shape[1] else window @ window.t()


def solve_grams(grams: Iterator[torch.Tensor], device: str) -> np.ndarray:
    """Ascending eigenvalues (>= 0) of same-shape Gram matrices, batched: (count, size)."""
    budget = _CHUNK_BYTES["cpu" if device == "cpu" else "gpu"]
    workers = torch.get_num_threads() if device == "cpu" else 1
    out, chunk = [], []
    for gram in grams:
        chunk.append(gram)
        if len(chunk) >= workers and len(chunk) * gram.numel() * 8 >= budget:
            out.append(_solve(chunk, device, workers))
            chunk = []
    if chunk:
        out.append(_solve(chunk, device, workers))
    return np.clip(np.concatenate(out), 0.0, None)


def _solve(chunk: list[torch.Tensor], device: str, workers: int) -> np.ndarray:
    batch = torch.stack(chunk)
    if device != "cpu":
        return torch.linalg.eigvalsh(batch).cpu().numpy()
    # numpy's LAPACK call is faster than torch's on CPU here, and releases the GIL. One
    # thread each, a single part included: OpenBLAS threads on small batched eigensolves
    # only contend (about 30x slower on a busy machine) and keep spinning afterwards.
    parts = np.array_split(batch.numpy(), min(workers, len(chunk)))
    with threadpool_limits(limits=1):
        if len(parts) == 1:
            return np.linalg.eigvalsh(parts[0])
        with ThreadPoolExecutor(len(parts)) as pool:
            return np.concatenate(list(pool.map(np.linalg.eigvalsh, parts)))
