"""The fine-tuning flows: each method beside its baseline, on the same data and seed."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flows.common import RunSettings
from flows.finetune import (
    AlphaLoraFinetuneParams,
    TempBalanceFinetuneParams,
    alphalora_finetune,
    tempbalance_finetune,
)
from steps.core.lineage import upstream
from steps.core.store import open_store

TINY = {"model": "tiny-llama", "max_train_examples": 48, "max_eval_examples": 16,
        "epochs": 1, "batch_size": 16, "max_length": 32}


def test_tempbalance_finetune_compares_with_the_plain_run(tmp_path, prefect_api):
    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    rows = tempbalance_finetune(TempBalanceFinetuneParams(**TINY, lr=1e-3), settings)
    assert [r["method"] for r in rows] == ["plain", "tempbalance"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["train_examples"] == 48 for r in rows)
    store = open_store(settings.store)
    for row in rows:  # the evaluate step sees the same test examples as the fine-tune
        values = json.loads(store.get(row["metrics"], tmp_path / "m.json").read_text())
        assert row["test_accuracy"] == pytest.approx(values["test_accuracy"], abs=1e-9)
    evaluated = upstream(store, rows[1]["evaluation"])
    assert {m.step for m in evaluated.steps.values()} >= {"build_model", "finetune", "evaluate"}
    graph = upstream(store, rows[1]["metrics"])
    made = {m.step: m for m in graph.steps.values()}
    assert made["finetune"].params["tempbalance"] == "sigmoid"
    assert {"build_model", "finetune"} <= set(made)
    assert tempbalance_finetune(TempBalanceFinetuneParams(**TINY, lr=1e-3), settings) == rows


def test_alphalora_finetune_spends_the_same_budget_two_ways(tmp_path, prefect_api):
    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    params = AlphaLoraFinetuneParams(**TINY, total=5, rank=4)
    rows = alphalora_finetune(params, settings)
    assert [r["method"] for r in rows] == ["uniform", "alphalora"]
    store = open_store(settings.store)
    counts = {}
    for row in rows:
        graph = upstream(store, row["metrics"])
        decisions = next(d for d, m in graph.artifacts.items() if m.kind == "decisions")
        table = pq.read_table(store.get(decisions, tmp_path / f"{row['method']}.parquet"))
        counts[row["method"]] = table["experts"].to_pylist()
        values = json.loads(store.get(row["metrics"], tmp_path / "m.json").read_text())
        assert 0 <= values["test_accuracy"] <= 1
    assert sum(counts["uniform"]) == sum(counts["alphalora"]) == 5
