"""AlphaLoRA expert counts."""

import numpy as np
import pytest
from allocate_helpers import layer_table

from steps.allocate import AllocationError, allocate
from steps.allocate.alphalora import reference_counts, residual_counts


def test_llama7b_total_order_and_top_k(llama7b):
    decisions = allocate(llama7b, "alphalora", metric="alpha_peak")
    experts = decisions["experts"].to_numpy()
    assert decisions.num_rows == 32
    assert experts.sum() == 160 and experts.min() >= 1
    assert decisions["name"].to_pylist()[3] == "model.layers.3"
    assert decisions["layers"].to_pylist() == [7] * 32
    alpha = decisions["alpha_peak"].to_numpy()
    assert np.all(np.diff(experts[np.argsort(alpha)]) >= 0)
    assert experts[np.argmax(alpha)] > experts[np.argmin(alpha)]
    np.testing.assert_array_equal(decisions["top_k"].to_numpy(), np.where(experts > 1, 2, 1))


def test_block_alpha_is_block_mean_and_beta_sharpens():
    table = layer_table([1.0, 3.0, 4.0, 4.0, 1.0, 1.0], per_block=2)
    flat = allocate(table, "alphalora", total=12, beta=0.0)
    assert flat["alpha_peak"].to_pylist() == [2.0, 4.0, 1.0]
    assert flat["experts"].to_pylist() == [4, 4, 4]
    sharp = allocate(table, "alphalora", total=12, beta=2.0)
    # quotas 12 * [4, 16, 1] / 21 = [2.29, 9.14, 0.57] -> [2, 9, 1]
    assert sharp["experts"].to_pylist() == [2, 9, 1]
    assert sharp["top_k"].to_pylist() == [2, 2, 1]


def test_residual_rounding_fixes_the_total_on_largest_residuals():
    # quotas [1.78, 2.67, 3.56] round to [2, 3, 4] = 9; the largest overshoot (block 2) gives one.
    assert residual_counts(8 * np.array([2.0, 3, 4]) / 9).tolist() == [2, 3, 3]
    # quotas [3.33] * 3 round to 9; the first of the tied largest shortfalls gets one.
    assert residual_counts(np.full(3, 10 / 3)).tolist() == [4, 3, 3]


def test_residual_rounding_keeps_at_least_one_expert():
    quotas = 6 * np.array([1.0, 1, 1, 10]) / 13
    assert residual_counts(quotas).tolist() == [1, 1, 1, 3]


def test_reference_rule_adjusts_by_unnormalised_weight():
    # Same quotas as above: the reference takes the expert from argmax(w - n) = block 0.
    assert reference_counts(np.array([2.0, 3, 4]), 8).tolist() == [1, 3, 4]
    table = layer_table([2.0, 3.0, 4.0])
    decisions = allocate(table, "alphalora", total=8, beta=1.0, mode="reference")
    assert decisions["experts"].to_pylist() == [1, 3, 4]
    assert decisions["top_k"].to_pylist() == [1, 2, 2]
    residual = allocate(table, "alphalora", total=8, beta=1.0)
    assert residual["experts"].to_pylist() == [2, 3, 3]


def test_reference_rule_that_empties_a_block_is_an_error():
    # quotas [.46, .46, .46, 4.6] -> [0, 0, 0, 5]; the missing one goes to argmin(w - n) = 0.
    assert reference_counts(np.array([1.0, 1, 1, 10]), 6).tolist() == [1, 0, 0, 5]
    with pytest.raises(AllocationError, match="0 experts"):
        allocate(layer_table([1.0, 1, 1, 10]), "alphalora", total=6, beta=1.0, mode="reference")


def test_fewer_experts_than_blocks_is_an_error():
    with pytest.raises(AllocationError, match="fewer than the 4 blocks"):
        allocate(layer_table([1.0, 2, 3, 4]), "alphalora", total=3)


def test_non_positive_alpha_is_an_error():
    with pytest.raises(AllocationError, match="must be > 0"):
        allocate(layer_table([1.0, 0.0]), "alphalora", total=4)
