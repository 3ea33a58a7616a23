"""The diagnose step: features and diagnosis of trained models, collect, and MD-tree fitting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from steps.core.errors import TailwiseError
from steps.core.factory import build_model, save_hf
from steps.core.registry import load_step
from steps.core.step import run_step
from steps.core.store import open_store
from steps.diagnose.mdtree import MDTree
from steps.diagnose.step import STEP, collect_inputs
from steps.finetune.plain import run_plain

DATA = Path(__file__).resolve().parents[1] / "data" / "md-tree"
TRAIN = {"batch_size": 32, "fraction": 0.5, "seed": 0, "epochs": 4, "lr": 0.1}
FAST = {"fraction": 0.5, "data_seed": 0, "hessian_samples": 100, "trace_probes": 8,
        "eigen_iterations": 10, "curve_epochs": 2, "line_points": 5}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two seeds of a trained width-16 MLP, and a width-8 one."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed, width in (("a", 0, 16), ("b", 1, 16), ("narrow", 0, 8)):
        start = save_hf(build_model("mlp", seed=seed, width=width), None, root / f"{name}-0")
        out[name] = save_hf(run_plain(start, "digits", **TRAIN).model, None, root / name)
    return out


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def put_models(store, models, *names) -> dict[str, str]:
    keys = {"a": "model", "b": "model_b", "narrow": "model_b"}
    return {keys[n]: store.put(models[n], "model").digest for n in names}


def put_json(store, tmp_path, name: str, value) -> str:
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return store.put(path, "md-tree").digest


def read_table(store, digest, tmp_path) -> pa.Table:
    return pq.read_table(store.get(digest, tmp_path / f"{digest[:10]}.parquet"))


def test_registered():
    assert load_step("diagnose") is STEP


def test_run_step_and_module_command_give_identical_digests(models, store, tmp_path):
    params = FAST | {"tags": {"batch_size": 32, "seed": 0}}
    inputs = put_models(store, models, "a", "b")
    result = run_step(STEP, params, inputs, store=store)
    assert set(result.outputs) == {"features"}
    row = read_table(store, result.digests()["features"], tmp_path).to_pylist()
    assert len(row) == 1
    row = row[0]
    assert (row["width"], row["batch_size"], row["fraction"], row["model_kind"]) == (
        16, 32, 0.5, "mlp")
    assert row["train_examples"] == 719 and 0 < row["CKA"] < 1
    assert row["mode_connectivity_peak"] <= 0 and row["hessian_t"] > 0

    other = tmp_path / "other"
    other_store = open_store(str(other))
    request = {"params": params, "inputs": put_models(other_store, models, "a", "b"),
               "store": str(other), "tracking": False}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run([sys.executable, "-m", "steps.diagnose", "--request",
                           str(tmp_path / "request.json")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    digests = {k: v["digest"] for k, v in json.loads(done.stdout)["outputs"].items()}
    assert digests == result.digests()


def test_diagnosis_path_follows_the_thresholds(models, store, tmp_path):
    tree = MDTree("bs_failure", (0.5, -10.0, 3.0))
    inputs = put_models(store, models, "a", "b") | {
        "tree": put_json(store, tmp_path, "tree.json", tree.to_json())}
    result = run_step(STEP, FAST, inputs, store=store)
    assert set(result.outputs) == {"features", "diagnosis"}
    found = json.loads(store.get(result.digests()["diagnosis"], tmp_path / "d.json").read_text())
    row = read_table(store, result.digests()["features"], tmp_path).to_pylist()[0]
    assert found["question"] == "bs_failure" and found["answer"] in ("small", "large")
    assert found["answer"] == tree.predict({k: [v] for k, v in row.items()
                                            if isinstance(v, float)})[0]
    path = found["path"]
    assert path[0]["column"] == "train_error" and path[0]["threshold"] == 0.5
    for step in path:
        assert step["value"] == pytest.approx(row[step["column"]])
        assert step["le"] == (step["value"] <= step["threshold"])
        assert step["threshold"] in tree.thresholds
    # The bs_failure shape: train_error > t0 leads to connectivity, <= t0 ends at 'small'.
    if path[0]["le"]:
        assert len(path) == 1 and found["answer"] == "small"
    else:
        assert path[1]["column"] == "mode_connectivity_peak"
    assert found["tree"]["thresholds"] == list(tree.thresholds)


def _released_zoo() -> pa.Table:
    """The released MD-tree collection (ResNet-18 / CIFAR-10) in the zoo table's layout."""
    t = pacsv.read_csv(DATA / "dataframe_normal_public.csv")
    columns = {"width": t["width"], "batch_size": t["bs"],
               "fraction": pc.divide(pc.cast(t["data"], pa.float64()), 10.0),
               "train_examples": t["data_amount"], "parameters": t["para_amount"]}
    for name in ("train_error", "train_loss", "test_error", "test_loss", "hessian_t",
                 "mode_connectivity_peak", "CKA"):
        columns[name] = t[name]
    return pa.table(columns), t


def test_fit_on_the_released_collection(store, tmp_path):
    zoo, released = _released_zoo()
    pq.write_table(zoo, tmp_path / "zoo.parquet")
    ref = store.put(tmp_path / "zoo.parquet", "model-zoo").digest
    result = run_step(STEP, {"mode": "fit"}, {"zoo": ref}, store=store)
    assert set(result.outputs) == {"labels", "tree", "report"}
    labels = read_table(store, result.digests()["labels"], tmp_path)
    # The zoo's labels are the released ones (same grid, same RFI rule).
    order = np.lexsort((released["bs"].to_numpy(), released["data"].to_numpy(),
                        released["width"].to_numpy()))
    ours = np.lexsort((labels["bs"].to_numpy(), labels["data"].to_numpy(),
                       labels["width"].to_numpy()))
    assert (labels["bs_failure"].to_numpy(zero_copy_only=False)[ours] ==
            released["bs_failure"].to_numpy(zero_copy_only=False)[order]).all()
    report = {r["method"]: r for r in read_table(store, result.digests()["report"],
                                                 tmp_path).to_pylist()}
    assert set(report) == {"md_tree", "hyperparameter_tree", "validation_tree", "majority"}
    md, majority = report["md_tree"], report["majority"]
    assert md["train_accuracy"] >= majority["train_accuracy"]
    # Held-out (fraction, width) cells: the landscape tree transfers, hyperparameters do not.
    assert md["test_accuracy"] > report["hyperparameter_tree"]["test_accuracy"] + 0.1
    assert md["test_accuracy"] > majority["test_accuracy"] + 0.2
    assert md["train_size"] + md["test_size"] == int(np.sum(
        released["bs_failure"].to_numpy(zero_copy_only=False) != "optimal"))
    tree = MDTree.from_json(store.get(result.digests()["tree"], tmp_path / "t.json").read_text())
    assert tree.question == "bs_failure"
    parts = set(labels["part"].to_pylist())
    assert parts == {"train", "test"}


def test_collect_then_fit_a_tiny_zoo(store, tmp_path):
    """A synthetic 2 widths x 3 batch sizes x 2 fractions zoo, rows collected one by one."""
    rng = np.random.default_rng(0)
    digests = []
    for width in (8, 16):
        for fraction in (0.5, 1.0):
            for batch_size, acc in ((16, 80.0), (64, 90.0), (256, 85.0)):
                row = {"width": width, "batch_size": batch_size, "fraction": fraction,
                       "test_error": 100 - acc - width / 8 - fraction,
                       "train_error": float(rng.uniform(0, 10)),
                       "train_loss": float(rng.uniform(0, 1)),
                       "test_loss": float(rng.uniform(0, 1)),
                       "mode_connectivity_peak": -float(rng.uniform(0, 20)),
                       "hessian_t": float(rng.uniform(4, 9)), "CKA": 0.5}
                path = tmp_path / f"row-{len(digests)}.parquet"
                pq.write_table(pa.Table.from_pylist([row]), path)
                digests.append(store.put(path, "landscape-features").digest)
    zoo = run_step(STEP, {"mode": "collect"}, collect_inputs(digests), store=store)
    table = read_table(store, zoo.digests()["zoo"], tmp_path)
    assert table.num_rows == 12 and table["batch_size"].to_pylist()[:3] == [16, 64, 256]
    fit = run_step(STEP, {"mode": "fit", "split": "all"}, {"zoo": zoo.digests()["zoo"]},
                   store=store)
    report = {r["method"]: r for r in read_table(store, fit.digests()["report"],
                                                 tmp_path).to_pylist()}
    # Every cell: batch 16 is too hot ('large'), 256 too cold ('small'), 64 optimal.
    assert report["md_tree"]["train_size"] == 8 and report["majority"]["train_accuracy"] == 0.5
    assert report["md_tree"]["train_accuracy"] >= report["majority"]["train_accuracy"]
    with pytest.raises(TailwiseError, match="empty part"):
        run_step(STEP, {"mode": "fit", "split": "scale", "scale_fraction": 1.0},
                 {"zoo": zoo.digests()["zoo"]}, store=store)


def _nothing_written(store, before):
    assert {m.digest for m in store.list()} == before


@pytest.mark.parametrize(("case", "message"), [
    ("not-json", "tree: not an MD tree JSON"),
    ("list", "tree: not an MD tree JSON"),
    ("other-method", "tree: not an MD tree JSON .*'method'"),
    ("needs-model-b", "give model_b"),
    ("other-question", "answers 'bs_failure', not the question 'width_vs_batch'"),
    ("narrow-b", "model_b: a mlp"),
    ("dataset", "invalid parameter dataset"),
    ("zoo-columns", "zoo: missing columns"),
    ("iris", "4 input features"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(models, store, tmp_path, case, message):
    tree = MDTree("bs_failure", (0.5, -10.0, 7.0)).to_json()
    params, inputs = dict(FAST), put_models(store, models, "a")
    if case in ("not-json", "list", "other-method", "needs-model-b", "other-question"):
        text = {"not-json": "{tree", "list": "[1, 2]",
                "other-method": json.dumps({"method": "cart"})}.get(case, tree)
        inputs["tree"] = put_json(store, tmp_path, "tree.json", text)
        if case == "other-question":
            inputs |= put_models(store, models, "b")
            params["question"] = "width_vs_batch"
    elif case == "narrow-b":
        inputs |= put_models(store, models, "narrow")
    elif case == "dataset":
        params["dataset"] = "mnist"
    elif case == "iris":
        params["dataset"] = "iris"
    elif case == "zoo-columns":
        pq.write_table(pa.table({"width": [1, 2]}), tmp_path / "zoo.parquet")
        params, inputs = {"mode": "fit"}, {"zoo": store.put(tmp_path / "zoo.parquet",
                                                            "model-zoo").digest}
    before = {m.digest for m in store.list()}
    with pytest.raises(TailwiseError, match=message):
        run_step(STEP, params, inputs, store=store)
    _nothing_written(store, before)
    assert store.cache_entries() == []


def test_cli_prints_the_diagnosis_and_its_path(models, tmp_path):
    from typer.testing import CliRunner

    from tailwise_cli import app

    tree = tmp_path / "tree.json"
    tree.write_text(MDTree("bs_failure", (0.5, -10.0, 3.0)).to_json())
    fast = ["--fraction", "0.5", "--trace-probes", "8", "--curve-epochs", "2"]
    store = ["--store", str(tmp_path / "store")]
    done = CliRunner().invoke(app, ["diagnose", str(models["a"]), "--model-b",
                                    str(models["b"]), "--tree", str(tree), *fast, *store],
                              env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert done.exit_code == 0, done.output
    assert "bs_failure:" in done.output and "train_error" in done.output
    assert "mode_connectivity_peak" in done.output


def test_curve_epochs_default_to_the_released_datas_50_over_fraction():
    from steps.diagnose.features import protocol_differences

    params = STEP.validate({"fraction": 0.4})
    assert params.curve_epochs == 125  # resolved before running, so the manifest has it
    assert STEP.validate({"fraction": 0.4, "curve_epochs": 3}).curve_epochs == 3
    assert STEP.validate({"mode": "collect"}).curve_epochs is None
    row = {"hessian_seeds": 5, "mode_connectivity_peak": 0.0, "curve_schedule": "reference",
           "fraction": 0.4}
    assert not any("epochs" in d for d in protocol_differences(row | {"curve_epochs": 125}))
    assert any("trained 3 epochs" in d for d in protocol_differences(row | {"curve_epochs": 3}))
