"""Landscape features of trained plain classifiers: direction, determinism, pair truths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from steps.core.factory import build_model, save_hf
from steps.diagnose.cka import output_cka
from steps.diagnose.features import (
    FeatureError,
    FeatureOptions,
    hessian_features,
    landscape_features,
    mixup_cka_inputs,
)
from steps.finetune.plain import plain_data, run_plain, training_subset

FAST = FeatureOptions(hessian_samples=100, trace_probes=8, eigen_iterations=10, curve_epochs=2,
                      line_points=5)
TRAIN = {"batch_size": 32, "fraction": 0.5, "seed": 0, "epochs": 5, "lr": 0.1}

DATA = Path(__file__).resolve().parents[1] / "data" / "md-tree"


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


# --- features as the released MD-tree data defines them ---

def test_hessian_t_is_the_log_of_the_mean_trace_over_the_seeds(trained):
    (model, model_b), data, train = trained
    one = hessian_features([model], train, FAST)
    other = hessian_features([model_b], train, FAST)
    both = hessian_features([model, model_b], train, FAST)
    mean = (one["hessian_trace"] + other["hessian_trace"]) / 2
    assert both["hessian_trace"] == pytest.approx(mean, rel=1e-12)
    assert both["hessian_t"] == pytest.approx(math.log(mean), rel=1e-12)
    assert both["hessian_seeds"] == 2 and one["hessian_seeds"] == 1
    pair = landscape_features(model, data, train, model_b=model_b, options=FAST)
    assert pair["hessian_t"] == pytest.approx(both["hessian_t"], rel=1e-12)


def test_cka_averages_ordered_pairs_on_mixup_training_inputs(trained):
    (model, model_b), data, train = trained
    pair = landscape_features(model, data, train, model_b=model_b, options=FAST)
    x = train[0]
    draws = [mixup_cka_inputs(x, FAST.seed), mixup_cka_inputs(x, FAST.seed + 1)]
    expected = (output_cka(model, model_b, draws[0]) + output_cka(model_b, model, draws[1])) / 2
    assert pair["CKA"] == pytest.approx(expected, rel=1e-12)
    assert pair["CKA"] != pytest.approx(output_cka(model, model_b, data.x_test), rel=1e-6)
    # 6 batches of 128 (or all the data), a fresh mix per draw.
    assert len(draws[0]) == min(len(x), 6 * 128)
    assert not torch.equal(draws[0], draws[1])


def test_diagnosis_says_when_a_released_data_tree_meets_features_computed_otherwise(
        trained, recwarn):
    from steps.diagnose.mdtree import MDTree, fit_mdtree, read_collection
    from steps.diagnose.step import diagnosis

    (model, model_b), data, train = trained
    row = {"dataset": "digits", "model_kind": "mlp"} | landscape_features(
        model, data, train, model_b=model_b, options=FAST)
    released = read_collection(DATA / "dataframe_normal_public.csv")
    tree = fit_mdtree(released, ["small"] * released.num_rows)
    assert tree.fitted_on == "released"
    assert MDTree.from_json(tree.to_json()).fitted_on == "released"
    with pytest.warns(UserWarning, match="fitted on the released MD-tree data"):
        result = diagnosis(tree, row)
    assert result["features_as_released_data"] is False
    assert any("2 seed(s)" in d for d in result["feature_differences"])
    assert "ResNet-18 on CIFAR-10" in result["note"]
    own = MDTree(tree.shape, tree.thresholds)
    assert own.fitted_on == "zoo" and diagnosis(own, row)["note"] is None
