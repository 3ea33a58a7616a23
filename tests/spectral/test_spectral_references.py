"""Every alpha column against a float64 port of the code its paper ran (reference_ports.py),
on default-initialised square layers, whose smallest eigenvalues lie below 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from reference_ports import analysis_esd, layer_eigs, net_esd_estimator

from steps.spectral import analyze


def _default_init(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(192, 192),
        torch.nn.Linear(128, 128),
        torch.nn.Conv2d(32, 32, 3),
        torch.nn.Conv2d(16, 48, 3),
    )


def _rows(model: torch.nn.Module) -> dict[str, dict]:
    return {r["name"]: r for r in analyze(model, device="cpu", workers=1).to_pylist()}


@pytest.mark.parametrize("seed", [11, 28])
def test_alpha_peak_and_hill_columns_equal_alphapruning_and_tempbalance(seed):
    model = _default_init(seed)
    square = list(model)[:3]
    assert all(layer_eigs(m)[0] < 1e-5 for m in square)  # the case the filter got wrong
    filtered = net_esd_estimator(model, "xmin_peak", filter_zeros=True)
    rows = _rows(model)
    peak = net_esd_estimator(model, "xmin_peak")
    half = net_esd_estimator(model, "xmin_mid", xmin_pos=2)
    third = net_esd_estimator(model, "xmin_mid", xmin_pos=1.5)
    for name, row in rows.items():
        assert row["alpha_peak"] == pytest.approx(peak[name], rel=1e-6), name
        assert row["alpha_hill"] == pytest.approx(half[name], rel=1e-6), name
        assert row["alpha_hill_k1.5"] == pytest.approx(third[name], rel=1e-6), name
    assert any(abs(peak[n] - filtered[n]) > 1 for n in rows)  # so dropping would be caught


def test_one_eigenvalue_below_1e5_moves_alpha_peak_of_a_192_square_layer():
    # The case: one eigenvalue < 1e-5 of a 192 x 192 matrix. Kept (as the
    # references keep it) alpha_peak is 4.31 here; dropped, it would be 5.62.
    torch.manual_seed(5)
    layer = torch.nn.Linear(192, 192)
    eigs = layer_eigs(layer)
    assert int((eigs < 1e-5).sum()) == 1
    kept = analysis_esd(eigs, "xmin_peak")
    dropped = analysis_esd(eigs, "xmin_peak", filter_zeros=True)
    assert abs(kept - dropped) > 1.0
    for estimator in ("alpha_peak", "ks"):
        row = analyze(layer, estimator=estimator, device="cpu").to_pylist()[0]
        assert row["alpha_peak"] == pytest.approx(kept, rel=1e-6)
    assert row["alpha"] != pytest.approx(kept, rel=1e-3)  # ks keeps its own filter


def test_estimator_option_sets_alpha_and_metadata_says_how_each_column_was_made():
    model = _default_init(5)
    table = analyze(model, estimator="hill", hill_k=1.5, device="cpu", workers=1)
    for row in table.to_pylist():
        assert row["alpha"] == row["alpha_hill_k1.5"]
    notes = json.loads(table.schema.metadata[b"tailwise.alphas"])
    assert set(notes) == {"alpha", "alpha_peak", "alpha_hill", "alpha_hill_k1.5"}
    assert "xmin_peak" in notes["alpha_peak"] and "filter_zeros=False" in notes["alpha_peak"]
    assert "k = 1.5" in notes["alpha"] and "k = 2.0" in notes["alpha_hill"]
    ks = json.loads(analyze(model, device="cpu").schema.metadata[b"tailwise.alphas"])
    assert "1e-05 dropped" in ks["alpha"]
