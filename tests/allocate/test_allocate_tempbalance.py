"""TempBalance learning-rate factors: linear map and the sigmoid block variant."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from allocate_helpers import layer_table

from steps.allocate import AllocationError, allocate
from steps.core.training.tempbalance import layer_param_groups


def test_linear_endpoints_and_bounds():
    alphas = [4.0, 2.0, 6.0, 3.0, 5.0]
    decisions = allocate(layer_table(alphas), "tempbalance", exclude_first_last=False)
    factor = decisions["lr_factor"].to_numpy()
    np.testing.assert_allclose(factor, [1.0, 0.5, 1.5, 0.75, 1.25])
    assert decisions["included"].to_numpy().all()


def test_first_and_last_layers_keep_factor_one_and_leave_the_range():
    alphas = [100.0, 2.0, 6.0, 4.0, 0.1]
    factor = allocate(layer_table(alphas), "tempbalance")["lr_factor"].to_numpy()
    np.testing.assert_allclose(factor, [1.0, 0.5, 1.5, 1.0, 1.0])


def test_small_layers_are_left_out_when_shapes_are_known():
    shapes = [(64, 64), (64, 10), (64, 64), (64, 64)]
    table = layer_table([1.0, 9.0, 2.0, 3.0], shapes=shapes)
    decisions = allocate(table, "tempbalance", exclude_first_last=False)
    np.testing.assert_allclose(decisions["lr_factor"].to_numpy(), [0.5, 1.0, 1.0, 1.5])
    assert decisions["included"].to_pylist() == [True, False, True, True]


def test_conv_layers_count_their_pooled_eigenvalues_like_the_scheduler():
    """A 3x3 conv with 16 in-channels has 16 * 9 = 144 pooled eigenvalues: balanced."""
    shapes = [(64, 64), (32, 16), (64, 64), (64, 64)]
    table = layer_table([1.0, 9.0, 2.0, 3.0], shapes=shapes)
    table = table.append_column("num_evals", [[64, 144, 64, 64]])
    decisions = allocate(table, "tempbalance", exclude_first_last=False)
    assert decisions["included"].to_pylist() == [True, True, True, True]
    from steps.core.factory import build_model
    from steps.core.training.tempbalance import TempBalance
    from steps.spectral import analyze

    model = build_model("cnn", seed=0)
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.1), lr=0.1)
    scheduler_view = TempBalance(model, optimizer).included
    # Every layer analysed (min_evals=1), so the table's first and last rows are the model's.
    metrics = analyze(model, estimator="hill", min_evals=1).drop_columns(["block"])
    policy_view = allocate(metrics, "tempbalance")["included"]
    assert policy_view.to_pylist() == list(scheduler_view)


def test_custom_range():
    decisions = allocate(
        layer_table([1.0, 2.0, 3.0]),
        "tempbalance",
        lr_min=0.2,
        lr_max=2.0,
        exclude_first_last=False,
    )
    np.testing.assert_allclose(decisions["lr_factor"].to_numpy(), [0.2, 1.1, 2.0])


def test_sigmoid_block_variant_formula():
    # Blocks of two layers: block means 1, 2, 3; mean over blocks 2.
    table = layer_table([0.5, 1.5, 2.0, 2.0, 3.5, 2.5], per_block=2)
    decisions = allocate(
        table, "tempbalance", variant="sigmoid", scale=0.5, exclude_first_last=False
    )
    phi = 0.5 * (1 / (1 + np.exp(-10 * np.array([-1.0, 0.0, 1.0]))) - 0.5)
    np.testing.assert_allclose(decisions["lr_factor"].to_numpy(), np.repeat(10**phi, 2))
    np.testing.assert_allclose(decisions["score"].to_numpy(), [1, 1, 2, 2, 3, 3])


def _reference_block_sigmoid(block_alphas, sigmoid_min, sigmoid_max, exp_temp=10.0):
    """Port of the TB_Sigmoid reference (ModelBalancing esd_utils.py, schedule_func
    "sigmoid"): stage_sigmoid on block-mean alpha minus the mean over blocks."""
    diffs = np.asarray(block_alphas, dtype=np.float64) - np.mean(block_alphas)
    factors = [(sigmoid_max if x > 0 else sigmoid_min) * (1 / (1 + np.exp(-exp_temp * x)) - 0.5)
               for x in diffs]
    return 10 ** np.array(factors)


@pytest.mark.parametrize("options,sides", [({}, (2.0, 1.0)),
                                           ({"scale_low": 0.25, "scale_high": 1.25},
                                            (0.25, 1.25)),
                                           ({"scale": 0.5}, (0.5, 0.5))])
def test_sigmoid_scales_below_and_above_the_mean_match_the_reference(options, sides):
    # Block means 1.0, 1.9, 2.25, 2.85: two blocks on each side of the mean 2.0.
    table = layer_table([0.5, 1.5, 2.0, 1.8, 2.5, 2.0, 3.2, 2.5], per_block=2)
    decisions = allocate(table, "tempbalance", variant="sigmoid", exclude_first_last=False,
                         **options)
    expected = _reference_block_sigmoid([1.0, 1.9, 2.25, 2.85], *sides)
    np.testing.assert_allclose(decisions["lr_factor"].to_numpy(), np.repeat(expected, 2),
                               rtol=1e-12)


def test_sigmoid_scale_and_side_scales_together_are_rejected():
    with pytest.raises(AllocationError, match="scale"):
        allocate(layer_table([1.0, 2.0, 3.0]), "tempbalance", variant="sigmoid", scale=1.0,
                 scale_low=0.5)


def test_sigmoid_bounds_and_monotone(llama7b):
    decisions = allocate(llama7b, "tempbalance", variant="sigmoid", metric="alpha_peak", scale=2.0)
    factor = decisions["lr_factor"].to_numpy()
    included = decisions["included"].to_numpy()
    assert factor.min() >= 10**-1 and factor.max() <= 10**1
    np.testing.assert_array_equal(factor[~included], 1.0)
    score = decisions["score"].to_numpy()[included]
    assert np.all(np.diff(factor[included][np.argsort(score)]) >= 0)


def test_llama7b_linear_hits_both_ends(llama7b):
    factor = allocate(llama7b, "tempbalance", metric="alpha_peak")["lr_factor"].to_numpy()
    assert factor.min() == pytest.approx(0.5) and factor.max() == pytest.approx(1.5)


def test_lr_min_above_lr_max_is_rejected():
    with pytest.raises(AllocationError, match="lr_min"):
        allocate(layer_table([1.0, 2.0]), "tempbalance", lr_min=2.0, lr_max=1.0)


def test_step_keeps_the_block_layers_when_blocks_only_dropped_the_model_s_ends(tmp_path):
    """The model's first and last layers (embedding, lm_head) are out of the blocks: the
    block layers at the ends of what is left are balanced, not left out in their place."""
    import pyarrow.parquet as pq

    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.store import open_store

    names = ["model.embed_tokens", "model.layers.0.q", "model.layers.0.o", "model.layers.1.q",
             "model.layers.1.o", "lm_head"]
    table = pa.table({"name": names, "block": [None, 0, 0, 1, 1, None],
                      "alpha_hill": [9.0, 2.0, 3.0, 4.0, 6.0, 0.5]})
    pq.write_table(table, tmp_path / "metrics.parquet")
    store = open_store(str(tmp_path / "store"))
    metrics = store.put(tmp_path / "metrics.parquet", "metrics").digest
    done = run_step(load_step("allocate"), {"policy": "tempbalance"}, {"metrics": metrics},
                    store=store)
    decisions = pq.read_table(store.get(done.digests()["decisions"], tmp_path / "d.parquet"))
    assert decisions["name"].to_pylist() == names[1:-1]
    assert decisions["included"].to_pylist() == [True] * 4
    np.testing.assert_allclose(decisions["lr_factor"].to_numpy(), [0.5, 0.75, 1.0, 1.5])
