"""Correlation traps (WeightWatcher's randomize=True) against WeightWatcher 0.7.7 itself: the
same seeded shuffles give the same lambda_max_rand, num_traps and rand_distance, on MiniLM
matrices and on a planted trap."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.neighbors import KernelDensity

from steps.core.pretrained import load_minilm
from steps.spectral import SpectralError, analyze
from steps.spectral.traps import linear_kde

ww = pytest.importorskip("weightwatcher")
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def one_layer(weight: torch.Tensor) -> torch.nn.Sequential:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return torch.nn.Sequential(layer)


def weightwatcher_traps(model: torch.nn.Module, seed: int) -> dict:
    np.random.seed(seed)  # WeightWatcher shuffles with numpy's global generator
    [row] = ww.WeightWatcher(model=model).analyze(randomize=True, min_evals=10).to_dict("records")
    return row


def our_traps(model: torch.nn.Module, seed: int) -> dict:
    [row] = analyze(model, device="cpu", randomize=True, seed=seed).to_pylist()
    return row


def assert_same_traps(model: torch.nn.Module, seed: int) -> dict:
    theirs, ours = weightwatcher_traps(model, seed), our_traps(model, seed)
    assert ours["lambda_max_rand"] == pytest.approx(theirs["max_rand_eval"], rel=1e-9)
    assert ours["rand_distance"] == pytest.approx(theirs["rand_distance"], rel=1e-9)
    assert ours["num_traps"] == theirs["num_traps"]
    return ours


def planted(spike: float) -> torch.Tensor:
    """Gaussian 200 x 80 (fewer than 100 eigenvalues: WeightWatcher pools 5 shuffles) plus a
    rank-one spike u v^T whose few entries are large."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 80, generator=generator, dtype=torch.float64) * 0.05
    u, v = torch.zeros(200, dtype=torch.float64), torch.zeros(80, dtype=torch.float64)
    u[[3, 70, 150]], v[[5, 40]] = 1.0, 1.0
    return (weight + spike * torch.outer(u, v)).float()


def test_linear_kde_equals_sklearn() -> None:
    values = np.sort(np.random.RandomState(0).gamma(2.0, 1.0, 500))
    grid = np.linspace(0, values.max() + 0.5, 1000)
    sklearn = KernelDensity(kernel="linear", bandwidth=0.1).fit(values[:, None])
    expected = np.exp(sklearn.score_samples(grid[:, None]))
    np.testing.assert_allclose(linear_kde(values, grid, 0.1), expected, atol=1e-12)


def test_planted_trap_is_found_as_weightwatcher_finds_it() -> None:
    trapped = assert_same_traps(one_layer(planted(spike=2.0)), seed=1)
    clean = assert_same_traps(one_layer(planted(spike=0.0)), seed=1)
    assert trapped["num_traps"] >= 1 and clean["num_traps"] == 0
    assert trapped["lambda_max_rand"] > 2 * clean["lambda_max_rand"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["encoder.layer.0.attention.self.query",  # Q = 1
                                  "encoder.layer.5.output.dense"])  # Q = 4
def test_minilm_matrices_match_weightwatcher(name: str) -> None:
    model, _ = load_minilm()
    assert_same_traps(one_layer(model.get_submodule(name).weight.detach()), seed=3)


def test_randomize_needs_pooled_conv_spectra() -> None:
    with pytest.raises(SpectralError, match="conv_slices=False"):
        analyze(one_layer(planted(0.0)), randomize=True, conv_slices=True)


def test_drift_flags_layers_with_new_traps() -> None:
    import pyarrow as pa

    from steps.drift.step import layer_drift

    def table(alphas, traps):
        return pa.table({"name": ["a", "b", "c"], "alpha": alphas,
                         "num_traps": pa.array(traps, pa.int64())})

    drift = layer_drift(table([3.0, 3.0, 3.0], [0, 2, None]),
                        table([3.1, 3.0, 4.0], [1, 2, 5]), "alpha", threshold=0.5)
    assert drift["new_traps"].to_pylist() == [True, False, False]
    assert drift["flagged"].to_pylist() == [False, False, True]
    assert drift["traps_current"].to_pylist() == [1, 2, 5]
    plain = layer_drift(table([3.0] * 3, [0] * 3).drop(["num_traps"]),
                        table([3.0] * 3, [1] * 3), "alpha", threshold=0.5)
    assert "new_traps" not in plain.column_names
