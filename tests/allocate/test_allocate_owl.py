"""OWL layerwise sparsity from given outlier ratios."""

import numpy as np
import pytest
from allocate_helpers import layer_table, weighted_mean

from steps.allocate import allocate
from steps.allocate.layers import read_metadata
from steps.allocate.owl import calibration_note, with_calibration


def owl_table(ratios, per_block=1, shapes=None):
    return layer_table(ratios, per_block=per_block, shapes=shapes, column="outlier_ratio")


@pytest.mark.parametrize("mode", ["reference", "clipped"])
def test_hand_example_follows_owl_formula(mode):
    # min-max to [0, 2 * 0.1] = [0, .05, .1, .2], mean .0875; sparsity = S + mean - spread.
    decisions = allocate(owl_table([1.0, 2.0, 3.0, 5.0]), "owl", sparsity=0.5, lam=0.1, mode=mode)
    np.testing.assert_allclose(
        decisions["sparsity"].to_numpy(), [0.5875, 0.5375, 0.4875, 0.3875], atol=1e-12
    )
    assert read_metadata(decisions, "clipped") is False


def test_more_outliers_means_less_pruning_and_span_is_two_lambda():
    ratios = [3.0, 9.0, 1.0, 4.0, 7.5]
    sparsity = allocate(owl_table(ratios), "owl", sparsity=0.7, lam=0.08)["sparsity"].to_numpy()
    assert np.all(np.diff(sparsity[np.argsort(ratios)]) < 0)
    assert np.ptp(sparsity) == pytest.approx(0.16)
    assert sparsity.mean() == pytest.approx(0.7, abs=1e-12)


def test_block_ratio_is_parameter_weighted_and_one_sparsity_per_block():
    shapes = [(10, 10), (10, 30), (10, 10), (10, 10)]
    table = owl_table([1.0, 5.0, 4.0, 4.0], per_block=2, shapes=shapes)
    decisions = allocate(table, "owl", sparsity=0.5, lam=0.1)
    # Block 0: (1 * 100 + 5 * 300) / 400 = 4, equal to block 1: no preference.
    np.testing.assert_allclose(decisions["score"].to_numpy(), 4.0)
    np.testing.assert_allclose(decisions["sparsity"].to_numpy(), 0.5)


def test_clipped_mode_keeps_parameter_weighted_budget_with_unequal_blocks():
    shapes = [(100, 100), (10, 10), (50, 10), (100, 300)]
    table = owl_table([2.0, 8.0, 3.0, 5.0], shapes=shapes)
    decisions = allocate(table, "owl", sparsity=0.6, lam=0.2)
    assert weighted_mean(decisions) == pytest.approx(0.6, abs=1e-9)
    assert np.all(np.diff(decisions["sparsity"].to_numpy()[[1, 3, 2, 0]]) > 0)


def test_clipping_at_both_ends_keeps_budget():
    ratios = [0.0, 1.0, 2.0, 10.0]
    clipped = allocate(owl_table(ratios), "owl", sparsity=0.9, lam=0.45)
    sparsity = clipped["sparsity"].to_numpy()
    assert sparsity.max() == pytest.approx(0.99) and sparsity.min() >= 0
    assert sparsity.mean() == pytest.approx(0.9, abs=1e-9)
    assert read_metadata(clipped, "clipped") is True
    low = allocate(owl_table(ratios), "owl", sparsity=0.05, lam=0.45)["sparsity"].to_numpy()
    assert low.min() == 0 and low.mean() == pytest.approx(0.05, abs=1e-9)


def test_reference_mode_replaces_non_positive_sparsity_like_owl_code():
    decisions = allocate(
        owl_table([0.0, 0.0, 0.0, 10.0]), "owl", sparsity=0.1, lam=0.2, mode="reference"
    )
    # spread [0, 0, 0, .4], mean .1: sparsity [.2, .2, .2, -.2 -> 0.01]
    np.testing.assert_allclose(decisions["sparsity"].to_numpy(), [0.2, 0.2, 0.2, 0.01])
    assert decisions["clipped"].to_pylist() == [False, False, False, True]


# --- calibration budget: the reference's by default, any smaller one said and stored ---

def test_step_measures_outlier_ratios_on_the_reference_calibration_by_default():
    from steps.allocate.step import AllocateParams

    params = AllocateParams(policy="owl")
    # luuyin/OWL main.py: --nsamples 128, model.seqlen = 2048.
    assert (params.calibration_samples, params.calibration_seqlen) == (128, 2048)


def test_decisions_record_the_calibration_budget_of_their_ratios():
    ratios = owl_table([1.0, 2.0, 3.0, 5.0])
    quick = allocate(with_calibration(ratios, samples=16, seqlen=512), "owl", sparsity=0.5)
    budget = read_metadata(quick, "calibration")
    assert budget == {"samples": 16, "seqlen": 512, "reference": False}
    note = calibration_note(budget)
    assert "16 x 512" in note and "not the reference setting" in note and "128 x 2048" in note

    full = allocate(with_calibration(ratios, samples=128, seqlen=2048), "owl", sparsity=0.5)
    assert read_metadata(full, "calibration")["reference"] is True
    assert calibration_note(read_metadata(full, "calibration")) is None
    # The decisions themselves do not depend on where the ratios came from.
    assert quick["sparsity"].to_pylist() == full["sparsity"].to_pylist()

    by_hand = read_metadata(allocate(ratios, "owl", sparsity=0.5), "calibration")
    assert by_hand["reference"] is None and "unknown calibration" in calibration_note(by_hand)


def test_owl_step_with_a_small_budget_warns_and_stores_it(tmp_path):
    import pyarrow.parquet as pq

    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.store import open_store

    store = open_store(str(tmp_path / "store"))
    model = run_step(load_step("build_model"), {"name": "tiny-llama"}, {}, store=store)
    model = model.digests()["model"]
    # Without an outlier_ratio column the step measures the ratios on the model.
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("name\nmodel.layers.0.mlp.up_proj\n")
    text = tmp_path / "calibration.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 200)
    inputs = {"metrics": store.put(metrics, "metrics").digest, "model": model,
              "calibration": store.put(text, "text").digest}
    with pytest.warns(UserWarning, match="from 2 x 64 calibration tokens, not the reference"):
        owl = run_step(load_step("allocate"), {"policy": "owl", "options": {"sparsity": 0.5},
                                               "calibration_samples": 2,
                                               "calibration_seqlen": 64}, inputs, store=store)
    decisions = pq.read_table(store.get(owl.digests()["decisions"], tmp_path / "owl.parquet"))
    assert read_metadata(decisions, "calibration") == {"samples": 2, "seqlen": 64,
                                                       "reference": False}
