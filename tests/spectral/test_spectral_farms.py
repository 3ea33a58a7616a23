"""FARMS alphas against a float64 port of the FARMS code (fixed_sampling + analysis_esd with
xmin_peak, nothing filtered; the Conv2d branch of net_esd_estimator_farms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_ports import analysis_esd, farms_conv2d_alpha, fixed_sampling

from steps.core.farms import FarmsOptions, farms_spectra
from steps.spectral import SpectralError, analyze


def _heavy_linear(rows: int, cols: int, seed: int) -> torch.nn.Linear:
    layer = torch.nn.Linear(cols, rows, bias=False)
    weight = np.random.default_rng(seed).standard_t(3, (rows, cols)) / np.sqrt(cols)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    return layer


def _farms_row(layer: torch.nn.Module, options: FarmsOptions) -> dict:
    return analyze(layer, farms=options, device="cpu", workers=1).to_pylist()[0]


@pytest.mark.parametrize(("shape", "window", "q", "ops"), [
    ((300, 120), 50, 1.0, 4),
    ((120, 300), 50, 1.0, 4),
    ((300, 120), 64, 1.5, 3),
    ((120, 300), 40, 0.5, 5),
    ((250, 90), 2000, 1.0, 10),  # window capped at the smaller side: 90 x 90
    ((90, 250), 2000, 1.0, 10),  # one row position, ten column positions
    ((140, 128), 120, 1.0, 3),  # overlapping column windows: blocks of one Gram
])
def test_matrix_alpha_equals_the_reference(shape, window, q, ops):
    layer = _heavy_linear(*shape, seed=sum(shape) + ops)
    reference_eigs = fixed_sampling(layer.weight.data, window, q, ops)
    reference = analysis_esd(reference_eigs, "xmin_peak")
    row = _farms_row(layer, FarmsOptions(window, q, ops))
    assert row["alpha_peak_farms"] == pytest.approx(reference, rel=1e-6)
    r = min(window, *shape)
    assert (row["farms_rows"], row["farms_cols"]) == (r, int(r * q))
    assert row["farms_windows"] * min(r, int(r * q)) == len(reference_eigs)
    assert row["farms_capped"] == (window > min(shape))


def test_pooled_eigenvalues_equal_per_window_singular_values():
    # Windows share row slabs and one batched eigensolve: the same eigenvalues as the loop.
    weight = _heavy_linear(200, 150, seed=3).weight.data
    spectra = farms_spectra(weight, "linear", FarmsOptions(60, 1.0, 4))
    reference = fixed_sampling(weight, 60, 1.0, 4).numpy()
    (pooled,) = spectra.groups
    np.testing.assert_allclose(pooled, reference, rtol=1e-8, atol=1e-12 * reference.max())
    assert spectra.windows == 16


@pytest.mark.parametrize(("channels", "q"), [((16, 40), 1.0), ((16, 40), 1.5), ((40, 16), 0.5),
                                             ((24, 24), 1.0)])
def test_conv2d_alpha_equals_the_reference_branch(channels, q):
    torch.manual_seed(sum(channels))
    conv = torch.nn.Conv2d(*channels, 3)
    reference = farms_conv2d_alpha(conv.weight.data, q)
    row = _farms_row(conv, FarmsOptions(q=q))
    assert row["alpha_peak_farms"] == pytest.approx(reference, rel=1e-6)
    bands = max(channels) // min(channels)
    assert row["farms_windows"] == 9 * bands


def test_window_wider_than_the_matrix_is_capped_and_said():
    layer = _heavy_linear(100, 80, seed=1)
    row = _farms_row(layer, FarmsOptions(window=60, q=1.5, ops=3))
    # int(60 * 1.5) = 90 columns > 80: cut to 80 (the reference would slice from -10).
    assert (row["farms_rows"], row["farms_cols"], row["farms_capped"]) == (60, 80, True)


@pytest.mark.parametrize(("options", "message"), [
    (FarmsOptions(ops=1), "FARMS ops 1 must be >= 2"),
    (FarmsOptions(q=0.0), "FARMS q 0.0 must be > 0"),
    (FarmsOptions(q=-1.0), "FARMS q -1.0 must be > 0"),
    (FarmsOptions(window=0), "FARMS window 0 must be at least 1 row"),
])
def test_bad_farms_options_are_one_line_errors(options, message):
    with pytest.raises(SpectralError, match=message):
        analyze(torch.nn.Linear(20, 20), farms=options)


def test_farms_needs_whole_matrices():
    with pytest.raises(SpectralError, match="cannot run with conv_slices"):
        analyze(torch.nn.Conv2d(16, 16, 3), farms=True, conv_slices=True)


def test_without_farms_the_table_has_no_farms_columns():
    table = analyze(torch.nn.Linear(20, 30), device="cpu")
    assert not [c for c in table.column_names if "farms" in c]


def test_windows_solved_over_threads_equal_one_thread():
    layer = _heavy_linear(300, 120, seed=7)
    options = FarmsOptions(50, 1.0, 4)
    one = farms_spectra(layer.weight.data, "linear", options).groups[0]
    torch.set_num_threads(2)
    try:
        two = farms_spectra(layer.weight.data, "linear", options).groups[0]
    finally:
        torch.set_num_threads(1)
    np.testing.assert_array_equal(one, two)
