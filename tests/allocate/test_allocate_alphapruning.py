"""AlphaPruning against the paper's numbers (METHODS.md section 2) and its budget rules."""

import numpy as np
import pyarrow as pa
import pytest
from allocate_helpers import layer_table, weighted_mean

from steps.allocate import AllocationError, allocate
from steps.allocate.layers import read_metadata


def block_sparsity(decisions: pa.Table) -> dict[int, float]:
    """One sparsity per block (all layers of a block share it)."""
    blocks = decisions["block"].to_numpy()
    sparsity = decisions["sparsity"].to_numpy()
    per_block = {}
    for b in np.unique(blocks):
        values = sparsity[blocks == b]
        assert np.ptp(values) == 0, f"block {b} has differing sparsities"
        per_block[int(b)] = float(values[0])
    return per_block


@pytest.mark.parametrize(("epsilon", "low", "high"), [(0.2, 0.568, 0.852), (0.3, 0.501, 0.930)])
def test_llama7b_reference_range_matches_paper(llama7b, epsilon, low, high):
    decisions = allocate(
        llama7b,
        "alphapruning",
        sparsity=0.7,
        epsilon=epsilon,
        metric="alpha_peak",
        mode="reference",
    )
    per_block = block_sparsity(decisions)
    assert min(per_block, key=per_block.get) == 9
    assert max(per_block, key=per_block.get) == 25
    assert per_block[9] == pytest.approx(low, abs=0.002)
    assert per_block[25] == pytest.approx(high, abs=0.002)
    assert weighted_mean(decisions) == pytest.approx(0.7, abs=1e-9)


def test_reference_rows_are_named_in_the_reference_module_order(llama7b):
    # METHODS.md's block 0, named as the reference code's modules: gate, down, up.
    names, alphas = llama7b["name"].to_pylist()[:7], llama7b["alpha_peak"].to_pylist()[:7]
    block0 = dict(zip(names, alphas, strict=True))
    published = {"q_proj": 1.329, "k_proj": 1.308, "v_proj": 3.917, "o_proj": 3.840,
                 "gate_proj": 1.720, "down_proj": 4.472, "up_proj": 1.769}
    for name, alpha in block0.items():
        assert alpha == pytest.approx(published[name.rsplit(".", 1)[1]], abs=6e-4)


def formula_block_sparsity(table: pa.Table, column: str, target: float, eps: float):
    """METHODS.md's AlphaPruning formula, computed here from the table: {block: sparsity}."""
    blocks = table["block"].to_numpy()
    alpha = table[column].to_numpy()
    params = (table["N"].to_numpy() * table["M"].to_numpy()).astype(float)
    block_alpha = {b: alpha[blocks == b].mean() for b in np.unique(blocks)}
    low, high = min(block_alpha.values()), max(block_alpha.values())
    ratio = np.array([(block_alpha[b] - low) / (high - low) * 2 * eps + 1 - eps for b in blocks])
    scale = target * params.sum() / (params @ ratio)
    return {int(b): float(ratio[blocks == b][0] * scale) for b in np.unique(blocks)}


def test_farms_alphas_llama7b_allocation_matches_the_formula(llama7b_farms):
    # FARMS's configs: eps 0.3 at 70 % sparsity, alphas from 15 x 15 windows of 2000 x 2000.
    decisions = allocate(llama7b_farms, "alphapruning", sparsity=0.7, epsilon=0.3,
                         metric="alpha_peak_farms", mode="reference")
    per_block = block_sparsity(decisions)
    expected = formula_block_sparsity(llama7b_farms, "alpha_peak_farms", 0.7, 0.3)
    assert min(per_block, key=per_block.get) == min(expected, key=expected.get)
    assert max(per_block, key=per_block.get) == max(expected, key=expected.get)
    assert min(per_block.values()) == pytest.approx(min(expected.values()), rel=1e-12)
    assert max(per_block.values()) == pytest.approx(max(expected.values()), rel=1e-12)
    # The window removes the aspect-ratio bias, not the ranking's spread: a wide range still.
    assert max(expected.values()) - min(expected.values()) > 0.3
    assert weighted_mean(decisions) == pytest.approx(0.7, abs=1e-9)


@pytest.mark.parametrize("mode", ["reference", "clipped"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.8])
def test_parameter_weighted_mean_is_target(llama7b, mode, epsilon, sparsity):
    decisions = allocate(
        llama7b,
        "alphapruning",
        sparsity=sparsity,
        epsilon=epsilon,
        metric="alpha_peak",
        mode=mode,
    )
    assert weighted_mean(decisions) == pytest.approx(sparsity, abs=1e-9)
    assert decisions["params"].to_numpy()[0] == 4096 * 4096


@pytest.mark.parametrize("fixture", ["llama2_7b", "llama13b"])
def test_other_reference_models_keep_budget_and_order(request, fixture):
    table = request.getfixturevalue(fixture)
    decisions = allocate(table, "alphapruning", sparsity=0.7, epsilon=0.3, metric="alpha_peak")
    assert weighted_mean(decisions) == pytest.approx(0.7, abs=1e-9)
    score = decisions["score"].to_numpy()
    sparsity = decisions["sparsity"].to_numpy()
    assert np.all(np.diff(sparsity[np.argsort(score)]) >= -1e-12)


def test_higher_block_alpha_is_pruned_more(llama7b):
    decisions = allocate(llama7b, "alphapruning", sparsity=0.7, epsilon=0.3, metric="alpha_peak")
    score = decisions["score"].to_numpy()
    sparsity = decisions["sparsity"].to_numpy()
    order = np.argsort(score, kind="stable")
    assert np.all(np.diff(sparsity[order]) >= 0)
    assert sparsity[np.argmax(score)] > sparsity[np.argmin(score)]


def test_score_is_plain_block_mean(llama7b):
    decisions = allocate(llama7b, "alphapruning", metric="alpha_peak")
    alpha = llama7b["alpha_peak"].to_numpy()
    assert decisions["score"].to_numpy()[0] == pytest.approx(alpha[:7].mean())
    assert decisions["score"].to_numpy()[7 * 31] == pytest.approx(alpha[-7:].mean())


def test_clipped_mode_caps_and_keeps_budget_where_reference_exceeds_one(llama7b):
    options = dict(sparsity=0.7, epsilon=0.8, metric="alpha_peak")
    reference = allocate(llama7b, "alphapruning", mode="reference", **options)
    clipped = allocate(llama7b, "alphapruning", mode="clipped", **options)

    assert reference["sparsity"].to_numpy().max() > 1
    assert read_metadata(reference, "exceeds_one") is True
    assert not reference["clipped"].to_numpy().any()

    capped = clipped["sparsity"].to_numpy()
    assert capped.max() == pytest.approx(0.99)
    assert capped.max() <= 0.99 and capped.min() >= 0
    assert weighted_mean(clipped) == pytest.approx(0.7, abs=1e-9)
    assert read_metadata(clipped, "clipped") is True
    # Layers the reference pushed past the cap are clipped; redistribution may clip more.
    flagged = clipped["clipped"].to_numpy()
    assert np.all(flagged[reference["sparsity"].to_numpy() > 0.99])
    assert capped[~flagged].max() < 0.99
    np.testing.assert_allclose(capped[flagged], 0.99)
    # The excess went to the others in proportion: their ratios to each other are unchanged.
    free_ratio = capped[~flagged] / reference["sparsity"].to_numpy()[~flagged]
    np.testing.assert_allclose(free_ratio, free_ratio[0])
    assert free_ratio[0] > 1


def test_clipped_equals_reference_when_nothing_clips(llama7b):
    options = dict(sparsity=0.7, epsilon=0.3, metric="alpha_peak")
    reference = allocate(llama7b, "alphapruning", mode="reference", **options)
    clipped = allocate(llama7b, "alphapruning", mode="clipped", **options)
    assert clipped["sparsity"].to_pylist() == reference["sparsity"].to_pylist()
    assert read_metadata(clipped, "clipped") is False


def test_max_sparsity_below_target_is_an_error(llama7b):
    with pytest.raises(AllocationError, match="exceeds max_sparsity"):
        allocate(
            llama7b,
            "alphapruning",
            sparsity=0.9,
            epsilon=0.5,
            max_sparsity=0.85,
            metric="alpha_peak",
        )


def test_equal_alphas_or_zero_epsilon_give_uniform():
    shapes = [(10, 20), (30, 5), (8, 8), (100, 3)]
    equal = allocate(layer_table([2.0] * 4, shapes=shapes), "alphapruning", sparsity=0.6)
    np.testing.assert_allclose(equal["sparsity"].to_numpy(), 0.6)
    spread = layer_table([1.0, 2.0, 3.0, 6.0], shapes=shapes)
    flat = allocate(spread, "alphapruning", sparsity=0.6, epsilon=0.0)
    np.testing.assert_allclose(flat["sparsity"].to_numpy(), 0.6)


def test_hand_example_without_shapes():
    # Two blocks of two layers, equal weights: block means 1 and 3, s = [0.8, 1.2] at eps 0.2.
    table = layer_table([0.5, 1.5, 2.0, 4.0], per_block=2)
    decisions = allocate(table, "alphapruning", sparsity=0.5, epsilon=0.2)
    np.testing.assert_allclose(decisions["sparsity"].to_numpy(), [0.4, 0.4, 0.6, 0.6])
    assert decisions["block"].to_pylist() == [0, 0, 1, 1]


def test_per_layer_mapping_ignores_blocks():
    table = layer_table([0.5, 1.5, 2.0, 4.0], per_block=2)
    decisions = allocate(table, "alphapruning", sparsity=0.5, epsilon=0.2, by_block=False)
    sparsity = decisions["sparsity"].to_numpy()
    assert np.all(np.diff(sparsity) > 0)
    assert sparsity.mean() == pytest.approx(0.5, abs=1e-12)
    assert sparsity[-1] / sparsity[0] == pytest.approx(1.2 / 0.8)


@pytest.mark.parametrize(
    "prefix", ["model.layers", "transformer.h", "encoder.layer", "blocks", "model.decoder.layers"]
)
def test_blocks_found_from_layer_names(prefix):
    table = layer_table([1.0, 1.0, 3.0, 3.0, 5.0, 5.0], per_block=2, prefix=prefix)
    decisions = allocate(table, "alphapruning", sparsity=0.5, epsilon=0.5)
    assert decisions["block"].to_pylist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(decisions["sparsity"].to_numpy()[::2], [0.25, 0.5, 0.75])


def test_block_column_overrides_names():
    table = pa.table({"name": ["a", "b", "c", "d"], "block": [0, 1, 0, 1],
                      "alpha_peak": [1.0, 3, 1, 3]})
    decisions = allocate(table, "alphapruning", sparsity=0.5, epsilon=0.5)
    np.testing.assert_allclose(decisions["sparsity"].to_numpy(), [0.25, 0.75, 0.25, 0.75])


def test_uniform_gives_target_everywhere(llama7b):
    decisions = allocate(llama7b, "uniform", sparsity=0.7)
    np.testing.assert_array_equal(decisions["sparsity"].to_numpy(), 0.7)
    assert decisions["block"].to_pylist()[7] == 1
    assert decisions.column_names[:1] == ["name"]
