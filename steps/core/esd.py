"""Empirical spectral densities: eigenvalues of W^T W for one weight tensor.

lambda = sigma^2, the squared singular values of the raw weights, no 1/N scaling
(METHODS.md section 1). They are computed as the float64 eigenvalues (``eigvalsh``)
of the smaller Gram matrix: measured here it reproduces WeightWatcher's alphas to
1e-10 while being several times cheaper than an SVD. float32 Gram matrices are
not used: they moved some conv alphas by up to 2.3.

Conv weights are cut into kernel slices W[:, :, i, j] (each out x in) whose
eigenvalues are pooled into one ESD. Conv2d eigenvalues are scaled by 0.5, the
reference tools' convention (alpha is unaffected, norms are); one row per slice
(``per_slice``) scales by kh*kw/2 like WeightWatcher's ``pool=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CONV2D_SCALE = 0.5
_GRAM_CHUNK_ELEMENTS = 1 << 20  # rows of W are converted to float64 in chunks this big (8 MB)


@dataclass(frozen=True)
class Spectrum:
    """The ESD of one matrix (or one conv slice, or pooled slices)."""

    evals: np.ndarray  # ascending float64, >= 0; empty when status is not "ok"
    N: int  # larger side of a slice
    M: int  # smaller side of a slice
    num_slices: int  # kernel slices pooled (1 for plain matrices)
    status: str = "ok"
    slice_id: int | None = None  # set in per-slice mode


def kernel_slices(tensor: torch.Tensor) -> torch.Tensor:
    """(S, out, in) view of a weight tensor: one slice per kernel position."""
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    if tensor.ndim == 3:  # (out, in, k)
        return tensor.permute(2, 0, 1)
    if tensor.ndim == 4:  # (out, in, kh, kw)
        return tensor.flatten(2).permute(2, 0, 1)
    raise ValueError(f"expected a 2-D to 4-D weight tensor, got shape {tuple(tensor.shape)}")


def eigenvalue_scale(layer_type: str, num_slices: int, per_slice: bool) -> float:
    """Factor applied to the eigenvalues (WeightWatcher's conv2d_norm)."""
    if layer_type != "conv2d":
        return 1.0
    return num_slices * CONV2D_SCALE if per_slice else CONV2D_SCALE


def compute_spectra(
    tensor: torch.Tensor, layer_type: str, *, per_slice: bool = False, device: str = "cpu"
) -> list[Spectrum]:
    """ESD of a weight tensor: one pooled Spectrum, or one per conv slice."""
    return compute_spectra_batch([tensor], layer_type, per_slice=per_slice, device=device)[0]


def compute_spectra_batch(
    tensors: list[torch.Tensor], layer_type: str, *, per_slice: bool = False, device: str = "cpu"
) -> list[list[Spectrum]]:
    """``compute_spectra`` for same-shape tensors; on a GPU they share one batched call."""
    slices = [kernel_slices(t) for t in tensors]
    finite = [bool(torch.isfinite(t).all()) for t in tensors]
    if device == "cpu":
        evals = [np.stack([gram_eigenvalues(s) for s in sl]) if ok else None
                 for sl, ok in zip(slices, finite, strict=True)]  # fmt: skip
    else:
        evals = [None] * len(tensors)
        todo = [i for i, ok in enumerate(finite) if ok]
        if todo:
            stacked = gram_eigenvalues_batched(torch.cat([slices[i] for i in todo]), device)
            for i, part in zip(todo, np.split(stacked, len(todo)), strict=True):
                evals[i] = part
    return [
        _spectra(e, sl.shape, layer_type, per_slice) for e, sl in zip(evals, slices, strict=True)
    ]


def _spectra(
    evals: np.ndarray | None, slices_shape: torch.Size, layer_type: str, per_slice: bool
) -> list[Spectrum]:
    """Scale and pool (or split) the per-slice eigenvalues, shape (S, min(rows, cols))."""
    count, rows, cols = slices_shape
    n, m = max(rows, cols), min(rows, cols)
    if evals is None:
        return [Spectrum(np.empty(0), n, m, count, "non-finite weights")]
    evals = evals * eigenvalue_scale(layer_type, count, per_slice)
    if per_slice and count > 1:
        return [Spectrum(e, n, m, 1, slice_id=i) for i, e in enumerate(evals)]
    return [Spectrum(np.sort(evals.ravel()), n, m, count)]


def gram_eigenvalues(matrix: torch.Tensor) -> np.ndarray:
    """Ascending eigenvalues (>= 0) of the smaller Gram matrix of a 2-D tensor, on CPU.

    The Gram matrix is accumulated from float64 row chunks, so the float64 copy of a
    large matrix is never held whole; ``W.T @ W`` on one buffer lets numpy use syrk.
    """
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.t()
    rows, cols = matrix.shape
    step = max(1, _GRAM_CHUNK_ELEMENTS // max(cols, 1))
    gram = np.zeros((cols, cols))
    for start in range(0, rows, step):
        rows_chunk = matrix[start : start + step].to(device="cpu")
        # One row-major float64 copy (a transposed view would otherwise need two).
        chunk = rows_chunk.to(torch.float64, memory_format=torch.contiguous_format).numpy()
        gram += chunk.T @ chunk
    evals = np.linalg.eigvalsh(gram)
    # Rounding can leave eigenvalues of a singular Gram matrix slightly negative.
    return np.clip(evals, 0.0, None)


def gram_eigenvalues_batched(batch: torch.Tensor, device: str) -> np.ndarray:
    """Ascending eigenvalues of the smaller Gram matrix of each (rows x cols) matrix in a
    batch, computed on ``device`` (a GPU) in float64. Returns (batch, min(rows, cols))."""
    batch = batch.to(device=device, dtype=torch.float64)
    if batch.shape[1] < batch.shape[2]:
        batch = batch.transpose(1, 2)
    gram = batch.transpose(1, 2) @ batch
    evals = torch.linalg.eigvalsh(gram)
    return np.clip(evals.cpu().numpy(), 0.0, None)
