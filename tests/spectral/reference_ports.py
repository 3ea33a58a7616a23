"""Float64 ports of the papers' ESD code, written from the reference code; no tailwise code.

- ``net_esd_estimator``: AlphaPruning ``lib/esd_utils.py`` (haiquanlu/AlphaPruning), whose
  loop TempBalance's ``tempbalance.py`` (YefanZhou/TempBalance, ``pl_fitting`` 'median' /
  'fix-finger') repeats line for line: squared singular values of each nn.Linear and
  nn.Conv2d weight (conv: kernel slices scaled by sqrt(0.5)), ``filter_zeros=False``.
- ``analysis_esd``: the fit both use (FARMS ``esd_utils_farms.analysis_esd`` is the same):
  ``xmin_peak`` (AlphaPruning) / 'fix-finger' (TempBalance) or ``xmin_mid`` / 'median'.
- ``fixed_sampling`` and ``farms_conv2d_alpha``: FARMS (HUST-AI-HYZ/FARMS)
  ``LLM_Pruning/lib/sampling.py`` and the Conv2d branch of ``net_esd_estimator_farms``.

The references run in float32 on the GPU; these run the same steps in float64 on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DTYPE = torch.float64


def analysis_esd(eigs: torch.Tensor, fix_fingers: str, xmin_pos: float = 2, bins: int = 100,
                 filter_zeros: bool = False, evals_thresh: float = 1e-5) -> float:
    """alpha of an ESD by the references' loop (fix_fingers 'xmin_peak' or 'xmin_mid')."""
    eigs = torch.sort(eigs.to(DTYPE)).values
    nz_eigs = eigs[eigs > evals_thresh] if filter_zeros else eigs
    if len(nz_eigs) == 0:
        nz_eigs = eigs
    n_total = len(nz_eigs)
    log_nz_eigs = torch.log(nz_eigs)
    if fix_fingers == "xmin_mid":
        i = int(len(nz_eigs) / xmin_pos)
        n = float(n_total - i)
        return float(1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i]))
    alphas = torch.zeros(n_total - 1, dtype=DTYPE)
    ds = torch.ones(n_total - 1, dtype=DTYPE)
    xmin_min, xmin_max = xmin_peak_bounds(nz_eigs, bins)
    for i, xmin in enumerate(nz_eigs[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(n_total - i)
        seq = torch.arange(n, dtype=DTYPE)
        alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[torch.argmin(ds)])


def xmin_peak_bounds(nz_eigs: torch.Tensor, bins: int = 100) -> tuple[float, float]:
    """(xmin_min, xmin_max) of xmin_peak: log10(0.95 peak) (the quirk) and 1.5 peak."""
    hist_nz_eigs = torch.log10(nz_eigs.to(DTYPE))
    min_e, max_e = hist_nz_eigs.min(), hist_nz_eigs.max()
    counts = torch.histc(hist_nz_eigs, bins, min=float(min_e), max=float(max_e))
    boundaries = torch.linspace(float(min_e), float(max_e), bins + 1, dtype=DTYPE)
    xmin2 = 10 ** boundaries[torch.argmax(counts)]
    return float(torch.log10(0.95 * xmin2)), float(1.5 * xmin2)


def layer_eigs(module: nn.Module, conv_norm: float = 0.5) -> torch.Tensor:
    """Ascending squared singular values of a Linear / Conv2d weight, as net_esd_estimator."""
    matrix = module.weight.data.clone().to(DTYPE)
    if isinstance(module, nn.Conv2d):
        matrix = torch.flatten(matrix, start_dim=2) * math.sqrt(conv_norm)
        matrix = matrix.transpose(1, 2).transpose(0, 1)
    return torch.sort(torch.square(torch.linalg.svdvals(matrix).flatten())).values


def net_esd_estimator(net: nn.Module, fix_fingers: str, xmin_pos: float = 2,
                      filter_zeros: bool = False) -> dict[str, float]:
    """alpha per Linear / Conv2d module name."""
    return {
        name: analysis_esd(layer_eigs(m), fix_fingers, xmin_pos, filter_zeros=filter_zeros)
        for name, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def fixed_sampling(matrix: torch.Tensor, num_row_samples: int, q_ratio: float,
                   sampling_ops_per_dim: int) -> torch.Tensor:
    """FARMS: pooled squared singular values of the windows of a Linear weight (no conv)."""
    matrix = matrix.to(DTYPE)
    rows, cols = matrix.shape
    num_row_samples = min(num_row_samples, min(rows, cols))
    num_col_samples = int(num_row_samples * q_ratio)
    row_step = max(1, (rows - num_row_samples) // (sampling_ops_per_dim - 1))
    col_step = max(1, (cols - num_col_samples) // (sampling_ops_per_dim - 1))
    num_row_windows = min(sampling_ops_per_dim, max(1, (rows - num_row_samples) // row_step + 1))
    num_col_windows = min(sampling_ops_per_dim, max(1, (cols - num_col_samples) // col_step + 1))
    all_eigs = []
    for i in range(num_row_windows):
        for j in range(num_col_windows):
            row_start = min(i * row_step, rows - num_row_samples)
            col_start = min(j * col_step, cols - num_col_samples)
            submatrix = matrix[row_start:row_start + num_row_samples,
                               col_start:col_start + num_col_samples]
            all_eigs.append(torch.square(torch.linalg.svdvals(submatrix)))
    return torch.sort(torch.cat(all_eigs)).values


def conv2d_wmats(weight: torch.Tensor) -> list[torch.Tensor]:
    """WeightWatcher's conv2D_Wmats for channels-last tensors: slices with rows >= cols."""
    out_channels, in_channels, imax, jmax = weight.shape
    assert out_channels + in_channels >= imax + jmax  # the channels-last branch
    mats = []
    for i in range(imax):
        for j in range(jmax):
            w = weight[:, :, i, j]
            mats.append(w.T if w.shape[0] < w.shape[1] else w)
    return mats


def farms_conv2d_alpha(weight: torch.Tensor, q_ratio: float, conv_norm: float = 0.5) -> float:
    """The Conv2d branch of net_esd_estimator_farms: mean alpha over row bands."""
    wmats = conv2d_wmats(weight.to(DTYPE))
    rows, cols = wmats[0].shape
    if q_ratio > 1:
        num_row_samples, num_col_samples = cols // q_ratio, cols
    else:
        num_row_samples, num_col_samples = cols, cols // (1 / q_ratio)
    num_row_samples = max(1, int(num_row_samples))
    num_col_samples = max(1, int(num_col_samples))
    alphas = []
    for i in range(int(rows // cols)):
        division_eigs = []
        for w in wmats:
            submatrix = w[i * num_row_samples:(i + 1) * num_row_samples, :num_col_samples]
            submatrix = submatrix * math.sqrt(conv_norm)
            division_eigs.append(torch.square(torch.linalg.svdvals(submatrix)))
        alphas.append(analysis_esd(torch.cat(division_eigs), "xmin_peak"))
    return sum(alphas) / len(alphas)
