"""The seeded training loop and the low-data subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from steps.core.data import digits_images, labelled_dataset
from steps.core.factory import build_model
from steps.core.training import low_data_indices, nrmse, train
from steps.core.training.tempbalance import TempBalanceError, layer_param_groups

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    data = labelled_dataset("digits", seed=0)
    x_train = torch.from_numpy(digits_images(data.x_train))
    x_test = torch.from_numpy(digits_images(data.x_test))
    return x_train, torch.from_numpy(data.y_train), x_test, torch.from_numpy(data.y_test)


def _run(digits, seed: int, epochs: int = 3, validate: bool = True, **kwargs):
    x, y, x_val, y_val = digits
    idx = low_data_indices(y.numpy(), 0.25, seed=0)
    model = build_model("cnn", seed=0)
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.05), lr=0.05, momentum=0.9)
    val = (x_val, y_val) if validate else None
    return train(model, (x[idx], y[idx]), val, optimizer=optimizer, epochs=epochs,
                 seed=seed, **kwargs)  # fmt: skip


def test_training_is_deterministic_and_learns(digits):
    seen = []
    first = _run(digits, seed=3, tempbalance={"rule": "linear"},
                 callback=lambda epoch, record: seen.append((epoch, record)))  # fmt: skip
    again = _run(digits, seed=3, tempbalance={"rule": "linear"})
    other = _run(digits, seed=4, tempbalance={"rule": "linear"})
    assert first.train_loss == again.train_loss and first.val_metric == again.val_metric
    assert first.train_loss != other.train_loss  # the seed drives the shuffling
    assert first.metric == "accuracy" and first.val_metric[-1] > 0.5  # chance is 0.1
    assert first.train_loss[-1] < first.train_loss[0]
    assert [e for e, _ in seen] == [0, 1, 2]
    assert seen[-1][1] == {"train_loss": first.train_loss[-1], "val_loss": first.val_loss[-1],
                           "accuracy": first.val_metric[-1]}  # fmt: skip
    # Factors from the initial weights, then after each epoch.
    assert [r.step for r in first.tempbalance] == [1, 2, 3, 4]
    assert 0 < first.tempbalance_seconds < first.train_seconds
    assert 0 < first.tempbalance_overhead < 1


def test_tempbalance_changes_training(digits):
    plain = _run(digits, seed=0)
    balanced = _run(digits, seed=0, tempbalance={"rule": "linear"})
    assert plain.tempbalance == [] and plain.tempbalance_seconds == 0
    assert plain.train_loss[0] != balanced.train_loss[0]


def test_regression_reports_nrmse():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 3, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))  # fmt: skip
    optimizer = torch.optim.Adam(layer_param_groups(model, 1e-2), lr=1e-2)
    history = train(model, (x[:200], y[:200]), (x[200:], y[200:]), optimizer=optimizer,
                    epochs=15, task="regression", tempbalance={"min_evals": 8})  # fmt: skip
    assert history.metric == "nrmse"
    assert history.val_metric[-1] < 0.5 * history.val_metric[0]
    with torch.no_grad():
        expected = float(nrmse(model(x[200:]), y[200:]).mean())
    assert history.val_metric[-1] == pytest.approx(expected, rel=1e-5)


def test_nrmse_definition():
    target = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    prediction = torch.tensor([[3.0, 4.0 + 5.0], [0.0, 0.0]])
    torch.testing.assert_close(nrmse(prediction, target), torch.tensor([1.0, 1.0]))


def test_low_data_indices_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = low_data_indices(labels, 0.1, seed=7)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 5, 3, 2]
    assert np.array_equal(idx, low_data_indices(labels, 0.1, seed=7))
    assert not np.array_equal(idx, low_data_indices(labels, 0.1, seed=8))
    # Largest remainder: 5 samples over quotas 2.5, 1.25, 0.75, 0.5 -> floors 2, 1, 0, 0, then
    # one more for the largest remainders 0.75 (class 2) and 0.5 (tie: class 0 before 3).
    subset = low_data_indices(labels, 0.025, seed=0)
    assert np.bincount(labels[subset], minlength=4).tolist() == [3, 1, 1, 0]
    assert np.array_equal(low_data_indices(labels, 1.0, seed=0), np.arange(200))


def test_low_data_indices_for_regression():
    idx = low_data_indices(1000, 0.025, seed=1)
    assert len(idx) == 25 and len(set(idx.tolist())) == 25 and idx.max() < 1000
    assert np.array_equal(idx, low_data_indices(1000, 0.025, seed=1))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\], got {fraction}"):
        low_data_indices(100, fraction, seed=0)


def test_bad_train_inputs(digits):
    with pytest.raises(TempBalanceError, match="lr_range"):
        _run(digits, seed=0, tempbalance={"lr_range": (1.5, 0.5)})
    with pytest.raises(ValueError, match="epochs"):
        _run(digits, seed=0, epochs=0)
    with pytest.raises(ValueError, match="unknown task"):
        _run(digits, seed=0, task="ranking")


def test_without_validation_data(digits):
    seen = []
    history = _run(digits, seed=0, epochs=2, validate=False,
                   callback=lambda epoch, record: seen.append(record))  # fmt: skip
    assert history.val_loss == [] and history.val_metric == [] and len(history.train_loss) == 2
    assert [set(record) for record in seen] == [{"train_loss"}, {"train_loss"}]
