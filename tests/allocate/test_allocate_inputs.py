"""Reading metrics files, the policy registry, bad input and the plot."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from allocate_helpers import layer_table

from steps.allocate import POLICIES, AllocationError, allocate, read_metrics
from steps.allocate.plots import plot_decisions


def test_csv_and_parquet_read_the_same(tmp_path):
    table = layer_table([1.0, 2.0, 3.0], shapes=[(4, 4), (4, 8), (8, 8)])
    pq.write_table(table, tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text(
        "name,alpha_peak,N,M\n"
        + "".join(
            f"{n},{a},{nn},{m}\n"
            for n, a, nn, m in zip(*table.select(["name", "alpha_peak", "N", "M"]).to_pydict()
                                   .values(), strict=True)
        )
    )
    from_parquet = allocate(read_metrics(tmp_path / "m.parquet"), "alphapruning", sparsity=0.5)
    from_csv = allocate(read_metrics(tmp_path / "m.csv"), "alphapruning", sparsity=0.5)
    assert from_parquet["sparsity"].to_pylist() == from_csv["sparsity"].to_pylist()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "no such metrics file"),
        ("m.txt", "name,alpha\n", "unknown format"),
        ("m.parquet", "not parquet", "cannot read metrics table"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(AllocationError, match=message) as err:
        read_metrics(path)
    assert str(path) in str(err.value)


def bad_input(tmp_path, rows: str) -> pa.Table:
    path = tmp_path / "metrics.csv"
    path.write_text(rows)
    return read_metrics(path)


@pytest.mark.parametrize(
    ("rows", "policy", "options", "message"),
    [
        ("name,alpha\nmodel.layers.0.q,1\n", "alphapruning", {},
         r"missing column\(s\) alpha_peak .*make it with `tailwise spectral MODEL`"),
        ("name,alpha\nmodel.layers.0.q,1\n", "alphapruning", {"metric": "alpha_peak_farms"},
         r"missing column\(s\) alpha_peak_farms .*`tailwise spectral MODEL --farms`"),
        ("name,alpha\nmodel.layers.0.q,1\n", "tempbalance", {}, r"missing column\(s\) alpha_hill "),
        ("alpha_peak\n1\n", "alphapruning", {}, r"missing column\(s\) name"),
        ("name,alpha_peak\n", "alphapruning", {}, "empty"),
        ("name,alpha_peak\nmodel.layers.0.q,1\nmodel.layers.1.q,\n", "alphapruning", {}, "NaN"),
        ("name,alpha_peak\nmodel.layers.0.q,1\nmodel.layers.1.q,nan\n", "alphalora", {}, "NaN"),
        ("name,alpha\nmodel.layers.0.q,1\nmodel.layers.0.q,2\n", "uniform", {}, "duplicate"),
        ("name,alpha_peak\nfc1,1\nfc2,2\n", "alphapruning", {}, "cannot find a block index in 2"),
        ("name,alpha_hill\nmodel.layers.0.q,x\n", "tempbalance", {}, "not numeric"),
        ("name,outlier_ratio\nmodel.layers.0.q,-1\n", "owl", {}, ">= 0"),
        ("name,block,alpha_peak\na,0.5,1\n", "alphapruning", {}, "block must hold integers"),
        ("name,alpha_peak,N,M\nmodel.layers.0.q,1,0,4\n", "alphapruning", {}, "must be positive"),
    ],
)
def test_bad_tables_name_the_input(tmp_path, rows, policy, options, message):
    table = bad_input(tmp_path, rows)
    with pytest.raises(AllocationError, match=message) as err:
        allocate(table, policy, **options)
    assert str(err.value).startswith(str(tmp_path / "metrics.csv") + ": ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("policy", "options", "message"),
    [
        ("alphapruning", {"sparsity": 1.0}, "sparsity=1.0: Input should be less than 1"),
        ("alphapruning", {"sparsity": -0.1}, "sparsity=-0.1: Input should be greater than"),
        ("alphapruning", {"epsilon": 1.0}, "epsilon=1.0: Input should be less than 1"),
        ("alphapruning", {"epsilon": -0.5}, "epsilon=-0.5"),
        ("uniform", {"sparsity": 1.5}, "uniform option sparsity=1.5"),
        ("owl", {"sparsity": 1.0}, "owl option sparsity=1.0"),
        ("alphapruning", {"mode": "loose"}, "mode='loose'"),
        ("alphalora", {"total": 0}, "total=0"),
        ("alphapruning", {"epsilom": 0.2}, "epsilom=0.2: Extra inputs are not permitted"),
    ],
)
def test_bad_options(policy, options, message):
    with pytest.raises(AllocationError, match=message) as err:
        allocate(layer_table([1.0, 2.0]), policy, **options)
    assert "\n" not in str(err.value)


def test_unknown_policy():
    with pytest.raises(AllocationError, match="unknown policy 'magic'.*alphapruning"):
        allocate(layer_table([1.0]), "magic")


def test_tables_without_blocks_still_work_per_layer():
    table = pa.table({"name": ["conv1", "fc"], "alpha_hill": [2.0, 4.0]})
    uniform = allocate(table, "uniform", sparsity=0.3)
    assert uniform["block"].to_pylist() == [None, None]
    lr = allocate(table, "tempbalance", exclude_first_last=False)
    assert lr["lr_factor"].to_pylist() == [0.5, 1.5]


def test_registry_names_decision_columns(llama7b):
    table = llama7b.append_column("outlier_ratio", pa.array(np.linspace(1, 5, 224)))
    metric = {"alphapruning": "alpha_peak", "tempbalance": "alpha_peak", "alphalora": "alpha_peak"}
    for name, policy in POLICIES.items():
        options = {"metric": metric[name]} if name in metric else {}
        decisions = allocate(table, name, **options)
        assert decisions.column_names[0] == "name"
        assert policy.decision in decisions.column_names


@pytest.mark.parametrize("policy", ["alphapruning", "tempbalance", "alphalora"])
def test_plot_is_written(tmp_path, llama7b, policy):
    decisions = allocate(llama7b, policy, metric="alpha_peak")
    path = plot_decisions(decisions, tmp_path / "plots" / f"{policy}.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_plot_without_decision_column(tmp_path):
    with pytest.raises(AllocationError, match="none of the columns"):
        plot_decisions(pa.table({"name": ["a"]}), tmp_path / "x.png")


@pytest.mark.parametrize(("policy", "options", "column"), [
    ("alphapruning", {}, "alpha_peak"),
    ("alphalora", {"total": 8}, "alpha_peak"),
    ("tempbalance", {}, "alpha_hill"),
    ("tempbalance", {"variant": "sigmoid"}, "alpha_hill_k1.5"),
    ("alphapruning", {"metric": "alpha"}, "alpha"),
])
def test_each_policy_reads_its_papers_alpha_by_default(policy, options, column):
    # A spectral table whose alpha columns all differ: the decision must follow `column`.
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i // 2}.proj{i % 2}" for i in range(8)]
    columns = ("alpha", "alpha_peak", "alpha_hill", "alpha_hill_k1.5")
    table = pa.table({"name": names, **{c: rng.uniform(1.5, 6.0, 8) for c in columns}})
    decisions = allocate(table, policy, **options)
    assert column in decisions.column_names
    recorded = json.loads(decisions.schema.metadata[b"tailwise.options"])
    assert recorded["metric"] == column
    expected = allocate(table.select(["name", column]), policy, **options | {"metric": column})
    decision = POLICIES[policy].decision
    assert decisions[decision].to_pylist() == expected[decision].to_pylist()
