"""Property tests: budgets, bounds and monotonicity hold for random tables."""

import numpy as np
import pyarrow as pa
from allocate_helpers import PAPER_COLUMNS
from hypothesis import given, settings
from hypothesis import strategies as st

from steps.allocate import allocate
from steps.allocate.budget import fit_budget

# No example database: a failure prints its example; nothing is replayed from disk.
PROPERTY = settings(max_examples=60, deadline=None, database=None)


@st.composite
def block_tables(draw, column: str = "alpha", min_value: float = 0.1):
    """Random blocks x layers, metric values and matrix shapes; "alpha" fills every
    paper's alpha column too (each policy's default)."""
    blocks = draw(st.integers(1, 12))
    per_block = draw(st.integers(1, 4))
    rows = blocks * per_block
    values = draw(
        st.lists(st.floats(min_value, 12.0, allow_nan=False), min_size=rows, max_size=rows)
    )
    dims = st.integers(1, 5000)
    shapes = draw(st.lists(st.tuples(dims, dims), min_size=rows, max_size=rows))
    return pa.table(
        {
            "name": [f"model.layers.{i // per_block}.proj{i % per_block}" for i in range(rows)],
            **{c: values for c in (PAPER_COLUMNS if column == "alpha" else (column,))},
            "N": [n for n, _ in shapes],
            "M": [m for _, m in shapes],
        }
    )


def weighted_mean(decisions: pa.Table, column: str = "sparsity") -> float:
    params = decisions["params"].to_numpy()
    return float(params @ decisions[column].to_numpy() / params.sum())


def assert_monotone(score: np.ndarray, decision: np.ndarray, increasing: bool = True) -> None:
    """A strictly higher score never gets a strictly lower (higher, if decreasing) decision."""
    sign = 1 if increasing else -1
    higher = score[:, None] > score[None, :]
    assert not np.any(higher & (sign * decision[:, None] < sign * decision[None, :] - 1e-12))


@PROPERTY
@given(
    table=block_tables(),
    sparsity=st.floats(0.0, 0.99),
    epsilon=st.floats(0.0, 0.99),
    mode=st.sampled_from(["clipped", "reference"]),
)
def test_alphapruning_budget_bounds_and_order(table, sparsity, epsilon, mode):
    decisions = allocate(table, "alphapruning", sparsity=sparsity, epsilon=epsilon, mode=mode)
    values = decisions["sparsity"].to_numpy()
    assert abs(weighted_mean(decisions) - sparsity) <= 1e-9
    assert values.min() >= 0
    if mode == "clipped":
        assert values.max() <= 0.99
    assert_monotone(decisions["score"].to_numpy(), values)


@PROPERTY
@given(
    table=block_tables("outlier_ratio", min_value=0.0),
    sparsity=st.floats(0.0, 0.99),
    lam=st.floats(0.0, 0.99),
)
def test_owl_budget_bounds_and_order(table, sparsity, lam):
    decisions = allocate(table, "owl", sparsity=sparsity, lam=lam)
    values = decisions["sparsity"].to_numpy()
    assert abs(weighted_mean(decisions) - sparsity) <= 1e-9
    assert values.min() >= 0 and values.max() <= 0.99
    assert_monotone(decisions["score"].to_numpy(), values, increasing=False)


@PROPERTY
@given(
    table=block_tables(),
    variant=st.sampled_from(["linear", "sigmoid"]),
    exclude=st.booleans(),
    scale=st.floats(0.25, 2.0),
)
def test_tempbalance_bounds_and_order(table, variant, exclude, scale):
    if exclude and table.num_rows < 3:
        return
    decisions = allocate(
        table, "tempbalance", variant=variant, exclude_first_last=exclude, scale=scale, min_eigs=0
    )
    factor = decisions["lr_factor"].to_numpy()
    included = decisions["included"].to_numpy()
    low, high = (0.5, 1.5) if variant == "linear" else (10 ** (-scale / 2), 10 ** (scale / 2))
    assert factor.min() >= low - 1e-12 and factor.max() <= high + 1e-12
    assert np.all(factor[~included] == 1.0)
    assert_monotone(decisions["score"].to_numpy()[included], factor[included])
    if variant == "linear" and np.ptp(decisions["score"].to_numpy()[included]) > 0:
        assert factor[included].min() == 0.5 and factor[included].max() == 1.5


@PROPERTY
@given(table=block_tables(min_value=0.5), extra=st.integers(0, 300), beta=st.floats(0.0, 4.0))
def test_alphalora_total_floor_order_and_top_k(table, extra, beta):
    blocks = len(set(n.split(".")[2] for n in table["name"].to_pylist()))
    total = blocks + extra
    decisions = allocate(table, "alphalora", total=total, beta=beta)
    experts = decisions["experts"].to_numpy()
    assert experts.sum() == total and experts.min() >= 1
    # Order follows alpha^beta (at beta = 0 every block has the same quota).
    assert_monotone(decisions["alpha_peak"].to_numpy() ** beta, experts)
    assert np.array_equal(decisions["top_k"].to_numpy(), np.where(experts > 1, 2, 1))


@PROPERTY
@given(
    raw=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=30),
    data=st.data(),
    target=st.floats(0.0, 0.9),
    how=st.sampled_from(["scale", "shift"]),
)
def test_fit_budget_meets_target_within_bounds(raw, data, target, how):
    raw = np.array(raw)
    weights = np.array(
        data.draw(st.lists(st.floats(1.0, 1e8), min_size=len(raw), max_size=len(raw)))
    )
    values, clipped = fit_budget(raw, weights, target, low=0.0, high=0.9, how=how)
    assert abs(weights @ values / weights.sum() - target) <= 1e-9
    assert values.min() >= 0 and values.max() <= 0.9
    assert_monotone(raw, values)
    # Unclipped layers keep the shape of the raw values: a common factor or a common shift.
    free = ~clipped
    if free.sum() > 1:
        fitted = values[free] / raw[free] if how == "scale" else values[free] - raw[free]
        np.testing.assert_allclose(fitted, fitted[0], rtol=1e-9, atol=1e-12)
