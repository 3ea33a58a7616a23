"""Flows on the embedded default: the spectral audit flags exactly the layers that moved."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
import torch

from flows.common import RunSettings
from flows.spectral_audit import AuditParams, spectral_audit
from steps.core.factory import build_model, save_hf
from steps.core.store import open_store

CHANGED = "transformer.h.1.mlp.c_fc"


@pytest.fixture
def checkpoints(tmp_path):
    """Two checkpoints of a 'training run': the second has one layer made heavy-tailed."""
    model = build_model("tiny-gpt2", seed=0)
    first = save_hf(model, None, tmp_path / "ckpt-0")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        weight = model.get_submodule(CHANGED).weight
        weight.copy_(torch.distributions.StudentT(1.5).sample(weight.shape) * 0.02)
    second = save_hf(model, None, tmp_path / "ckpt-1")
    return str(first), str(second)


def test_audit_flags_moved_layers_and_compares_with_the_previous_audit(tmp_path, checkpoints,
                                                                       prefect_api):
    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    params = AuditParams(models=list(checkpoints), name="run-1", threshold=0.5, randomize=True)
    first = spectral_audit(params, settings)
    assert first["previous"] is None and len(first["drifts"]) == 1
    store = open_store(settings.store)
    drift = pq.read_table(store.get(first["drifts"][0], tmp_path / "drift.parquet"))
    flagged = [n for n, f in zip(drift["name"].to_pylist(), drift["flagged"].to_pylist(),
                                 strict=True) if f]
    assert flagged == [CHANGED]
    # The heavy-tailed layer's few huge entries are correlation traps once shuffled.
    trapped = [n for n, f in zip(drift["name"].to_pylist(), drift["new_traps"].to_pylist(),
                                 strict=True) if f]
    assert trapped == [CHANGED]

    again = spectral_audit(params.model_copy(update={"models": [checkpoints[1]]}), settings)
    assert again["previous"] == first["metrics"][-1] and len(again["drifts"]) == 1
    same = pq.read_table(store.get(again["drifts"][0], tmp_path / "again.parquet"))
    assert not any(same["flagged"].to_pylist()) and same.num_rows == drift.num_rows
    assert not any(same["new_traps"].to_pylist())


def test_alpha_prune_runs_both_allocations_and_reruns_cached(tmp_path, prefect_api):
    from flows.alpha_prune import AlphaPruneParams, alpha_prune
    from steps.core.lineage import FORMATS, render, upstream

    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    params = AlphaPruneParams(model="tiny-llama", sparsity=0.5, nsamples=2, seqlen=64,
                              text_chars=20_000, eval_windows=2, tasks=["kjv_next_verse"],
                              limit=4)
    rows = alpha_prune(params, settings)
    by_name = {row["allocation"]: row for row in rows}
    assert set(by_name) == {"dense", "uniform", "alphapruning"}
    assert by_name["dense"]["sparsity"] < 0.01
    for name in ("uniform", "alphapruning"):
        assert 0.3 < by_name[name]["sparsity"] < 0.6
        assert by_name[name]["perplexity"] > 0
    for row in rows:  # 4 examples of the shipped zero-shot task: accuracy in quarters
        assert row["kjv_next_verse acc"] in (0, 0.25, 0.5, 0.75, 1)
    graph = upstream(open_store(settings.store), by_name["alphapruning"]["evaluation"])
    made = {m.step: m for m in graph.steps.values()}
    assert {"build_model", "build_text", "spectral", "allocate", "prune", "evaluate"} <= set(made)
    assert made["allocate"].params["policy"] == "alphapruning"
    for fmt in FORMATS:  # every format names each step, its params and its input digests
        page = render(graph, fmt)
        for step in made.values():
            assert step.step in page, (fmt, step.step)
            assert all(digest[:12] in page for digest in step.inputs.values()), (fmt, step.step)
        assert "alphapruning" in page and "epsilon" in page, fmt

    again = alpha_prune(params, settings)
    assert again == rows


def test_computed_steps_emit_asset_materialisation_events(tmp_path, prefect_api):
    import httpx

    from flows.demo import DemoParams, demo
    from steps.core.store import manifest_key

    settings = RunSettings(store=str(tmp_path / "store"), tracking=False)
    results = demo(DemoParams(model="mlp"), settings)
    store = open_store(settings.store)
    metrics = store.uri(results["spectral"].digests()["metrics"])
    model = store.uri(results["build_model"].digests()["model"])
    assert metrics.endswith(manifest_key(results["spectral"].digests()["metrics"]))
    with httpx.Client(base_url=prefect_api, trust_env=False, timeout=10) as client:
        deadline = time.monotonic() + 60
        while True:  # events reach the server asynchronously
            events = client.post("/events/filter", json={"filter": {
                "event": {"prefix": ["prefect.asset.materialization"]},
                "any_resource": {"id": [metrics]}}}).raise_for_status().json()["events"]
            if events or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # poll interval, not a synchronisation
    assert events, f"no materialisation event for {metrics}"
    related = {r["prefect.resource.id"] for e in events for r in e["related"]}
    assert model in related


def test_owl_allocation_measures_outlier_ratios_from_calibration(tmp_path):
    from steps.core.registry import load_step
    from steps.core.step import run_step

    store = open_store(str(tmp_path / "store"))
    model = run_step(load_step("build_model"), {"name": "tiny-llama"}, {}, store=store)
    model = model.digests()["model"]
    metrics = run_step(load_step("spectral"), {"plots": False}, {"model": model}, store=store)
    text = tmp_path / "calibration.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 200)
    inputs = {"metrics": metrics.digests()["metrics"], "model": model,
              "calibration": store.put(text, "text").digest}
    owl = run_step(load_step("allocate"), {"policy": "owl", "options": {"sparsity": 0.5},
                                           "calibration_samples": 2, "calibration_seqlen": 64},
                   inputs, store=store)
    decisions = pq.read_table(store.get(owl.digests()["decisions"], tmp_path / "owl.parquet"))
    sparsity = decisions["sparsity"].to_pylist()
    params = decisions["params"].to_pylist()
    mean = sum(s * p for s, p in zip(sparsity, params, strict=True)) / sum(params)
    assert abs(mean - 0.5) < 1e-9 and len(set(sparsity)) > 1
