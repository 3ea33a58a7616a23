"""The model_zoo flow: a tiny grid trained, measured, collected and fitted; reruns cached."""

from __future__ import annotations

import pyarrow.parquet as pq

from flows.common import RunSettings
from flows.model_zoo import ModelZooParams, model_zoo
from steps.core.lineage import upstream
from steps.core.store import open_store
from steps.diagnose.mdtree import METHODS, MDTree


def test_model_zoo_reports_every_method_and_reruns_cached(tmp_path, prefect_api):
    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    params = ModelZooParams(widths=[8, 16], batch_sizes=[16, 128], fractions=[0.25, 1.0],
                            epochs=2, hessian_samples=100, trace_probes=4,
                            eigen_iterations=5, curve_epochs=1)
    report = model_zoo(params, settings)
    assert {row["method"] for row in report} == set(METHODS)
    for row in report:
        assert row["question"] == "bs_failure" and row["split"] == "cells"
        assert row["train_size"] >= 1 and 0 <= row["train_accuracy"] <= 1

    store = open_store(settings.store)
    [zoo] = store.list("model-zoo")
    table = pq.read_table(store.get(zoo.digest, tmp_path / "zoo.parquet"))
    assert table.num_rows == 8  # 2 widths x 2 batch sizes x 2 fractions
    assert sorted(set(table["width"].to_pylist())) == [8, 16]
    assert sorted(set(table["batch_size"].to_pylist())) == [16, 128]
    assert set(table["seed_b"].to_pylist()) == {1}
    assert {"mode_connectivity_peak", "hessian_t", "CKA", "train_error"} <= set(
        table.column_names)
    [tree] = store.list("md-tree")
    assert MDTree.from_json(store.get(tree.digest, tmp_path / "tree.json").read_text()
                            ).question == "bs_failure"
    made = {m.step for m in upstream(store, tree.digest).steps.values()}
    assert {"build_model", "finetune", "diagnose"} <= made

    assert model_zoo(params, settings) == report
