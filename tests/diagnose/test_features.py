"""Landscape features of trained plain classifiers: direction, determinism, pair truths."""

from __future__ import annotations

import math

import pytest

from steps.core.factory import build_model, save_hf
from steps.diagnose.features import FeatureError, FeatureOptions, landscape_features
from steps.finetune.plain import plain_data, run_plain, training_subset

FAST = FeatureOptions(hessian_samples=100, trace_probes=8, eigen_iterations=10, curve_epochs=2,
                      line_points=5)
TRAIN = {"batch_size": 32, "fraction": 0.5, "seed": 0, "epochs": 5, "lr": 0.1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two seeds of a width-16 MLP trained on the same half of digits, and that data."""
    root = tmp_path_factory.mktemp("zoo")
    models = []
    for seed in (0, 1):
        path = save_hf(build_model("mlp", seed=seed, width=16), None, root / f"seed-{seed}")
        models.append(run_plain(path, "digits", **TRAIN).model)
    data = plain_data("digits", models[0])
    return models, data, training_subset(data, TRAIN["fraction"], TRAIN["seed"])


def test_trained_model_fits_better_and_is_sharper_than_untrained(trained):
    (model, _), data, train = trained
    after = landscape_features(model, data, train, options=FAST)
    before = landscape_features(build_model("mlp", seed=0, width=16), data, train, options=FAST)
    assert after["train_error"] < before["train_error"] - 30  # an untrained one is at ~90 %
    assert after["test_error"] < before["test_error"] - 30
    assert after["train_loss"] < before["train_loss"]
    # Near initialisation the softmax outputs are flat and the curvature small; training
    # sharpens the landscape (larger trace and top eigenvalue).
    assert after["hessian_t"] > before["hessian_t"] + 1
    assert after["hessian_top"] > before["hessian_top"]
    assert math.isclose(after["hessian_t"], math.log(after["hessian_trace"]))
    assert 0 < after["hessian_t_stderr"] < 0.5
    assert "CKA" not in after and after["train_examples"] == len(train[1])


def test_features_are_deterministic_given_seeds(trained):
    (model, model_b), data, train = trained
    first = landscape_features(model, data, train, model_b=model_b, options=FAST)
    again = landscape_features(model, data, train, model_b=model_b, options=FAST)
    assert first == again
    other = landscape_features(model, data, train, model_b=model_b,
                               options=FeatureOptions(**{**FAST.__dict__, "seed": 1}))
    assert other["hessian_trace"] != first["hessian_trace"]  # other probes
    assert other["train_error"] == first["train_error"]


def test_pair_features_of_two_seeds_and_of_a_model_with_itself(trained):
    (model, model_b), data, train = trained
    pair = landscape_features(model, data, train, model_b=model_b, options=FAST)
    assert -100 <= pair["mode_connectivity_peak"] <= 0
    assert 0 < pair["CKA"] < 1
    assert pair["lmc_barrier"] == -pair["lmc"]
    # Averaging two independently initialised networks' weights costs accuracy: a barrier.
    assert pair["lmc_barrier"] > 5
    same = landscape_features(model, data, train, model_b=model, options=FAST)
    # The line from a model to itself is the model; a curve's bend starts there and, trained
    # briefly, stays close (it may fit the data a little better, never much worse).
    assert same["lmc"] == pytest.approx(0, abs=1e-9) and same["lmc_barrier"] == 0
    assert abs(same["mode_connectivity_peak"] + same["train_error"]) < 3
    assert same["curve_barrier"] < 1 and pair["curve_barrier"] > same["curve_barrier"]
    assert same["CKA"] == pytest.approx(1.0)


def test_model_b_of_another_architecture_is_refused(trained):
    (model, _), data, train = trained
    with pytest.raises(FeatureError, match="model_b: a mlp"):
        landscape_features(model, data, train, model_b=build_model("mlp", seed=0, width=8))
    with pytest.raises(FeatureError, match="model_b: a cnn"):
        landscape_features(model, data, train, model_b=build_model("cnn", seed=0))


def test_bad_options_are_refused():
    with pytest.raises(FeatureError, match="trace_probes"):
        FeatureOptions(trace_probes=0)
    with pytest.raises(FeatureError, match="interior"):
        FeatureOptions(curve_points=2)
