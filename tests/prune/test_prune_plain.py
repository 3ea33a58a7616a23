"""Magnitude pruning of plain MLP / CNN models: exact density, deterministic, checked inputs."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from steps.core.errors import TailwiseError
from steps.core.factory import build_model, load_model, save_hf
from steps.core.registry import load_step
from steps.core.sparsity import density, prunable_weights
from steps.core.step import run_step
from steps.core.store import open_store
from steps.prune import REPORT_FILE, PruneError
from steps.prune.plain import prune_plain


def _zeros(model) -> int:
    return sum(int((w == 0).sum()) for w in prunable_weights(model).values())


def _total(model) -> int:
    return sum(w.numel() for w in prunable_weights(model).values())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98])
def test_global_pruning_hits_the_density_exactly_and_keeps_the_largest(name, sparsity):
    model = build_model(name, seed=0, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_plain(model, sparsity=sparsity)
    total = _total(model)
    assert _zeros(model) == round(total * sparsity)
    assert density(model) == (total - round(total * sparsity)) / total
    weights = torch.cat([w.flatten() for w in prunable_weights(model).values()])
    original = torch.cat([before[k].flatten() for k in prunable_weights(model)])
    kept, pruned = original[weights != 0].abs(), original[weights == 0].abs()
    if len(pruned):  # one global threshold: every kept |w| >= every pruned |w|
        assert kept.min() >= pruned.max()
    assert torch.equal(weights[weights != 0], original[weights != 0])  # survivors untouched
    for key, value in model.state_dict().items():  # biases, BatchNorm: not pruned
        if key not in prunable_weights(model):
            assert torch.equal(value, before[key]), key
    assert report.column_names == ["name", "target", "achieved", "params"]
    assert report["name"].to_pylist() == [k.removesuffix(".weight")
                                          for k in prunable_weights(model)]
    assert sum(a * p for a, p in zip(report["achieved"].to_pylist(),
                                     report["params"].to_pylist(), strict=True)) == \
        pytest.approx(_zeros(model))


def test_pruning_is_deterministic_and_breaks_ties_by_position():
    a, b = build_model("mlp", seed=3, width=8), build_model("mlp", seed=3, width=8)
    prune_plain(a, sparsity=0.75)
    prune_plain(b, sparsity=0.75)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))
    flat = build_model("mlp", seed=0, width=4)
    with torch.no_grad():
        for w in prunable_weights(flat).values():
            w.fill_(1.0)  # all tied: the first weights in module order go first
    prune_plain(flat, sparsity=0.5)
    weights = torch.cat([w.flatten() for w in prunable_weights(flat).values()])
    half = round(len(weights) * 0.5)
    assert bool((weights[:half] == 0).all()) and bool((weights[half:] == 1).all())


def test_an_allocation_prunes_each_named_layer_to_its_own_ratio():
    model = build_model("mlp", seed=0, width=16)
    report = prune_plain(model, allocation={"layers.0": 0.5, "layers.4": 0.2}, sparsity=0.1)
    achieved = dict(zip(report["name"].to_pylist(), report["achieved"].to_pylist(),
                        strict=True))
    targets = dict(zip(report["name"].to_pylist(), report["target"].to_pylist(), strict=True))
    assert targets == {"layers.0": 0.5, "layers.2": 0.1, "layers.4": 0.2}
    for name, layer in (("layers.0", model.layers[0]), ("layers.2", model.layers[2]),
                        ("layers.4", model.layers[4])):
        assert achieved[name] == round(layer.weight.numel() * targets[name]) / \
            layer.weight.numel()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": 1.0}, "outside"),
    ({"sparsity": -0.1}, "outside"),
    ({"sparsity": math.nan}, "outside"),
    ({}, "give a sparsity or an allocation"),
    ({"sparsity": 0.5, "method": "wanda"}, "magnitude only"),
    ({"sparsity": 0.5, "nm": "2:4"}, "N:M"),
    ({"allocation": {"layers.9": 0.5}}, "not prunable layers"),
    ({"allocation": {"layers.0": 1.5}}, "outside"),
])
def test_bad_requests_change_nothing(kwargs, message):
    model = build_model("mlp", seed=0, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match=message):
        prune_plain(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_prune_step_saves_a_plain_model_the_other_steps_load(tmp_path):
    store = open_store(str(tmp_path / "store"))
    source = save_hf(build_model("cnn", seed=0, width=4), None, tmp_path / "cnn")
    digest = store.put(source, "model").digest
    step = load_step("prune")
    result = run_step(step, {"method": "magnitude", "sparsity": 0.8}, {"model": digest},
                      store=store)
    out = store.get(result.digests()["model"], tmp_path / "pruned")
    model = load_model(out)
    assert density(model) == pytest.approx(0.2, abs=1 / _total(model))
    assert pq.read_table(out / REPORT_FILE).num_rows == len(prunable_weights(model))
    again = run_step(step, {"method": "magnitude", "sparsity": 0.8}, {"model": digest},
                     store=store, use_cache=False)
    assert again.digests() == result.digests()  # same model and ratio: same artifact
    text = tmp_path / "calibration.txt"
    text.write_text("a calibration text for a model that takes none " * 20)
    with pytest.raises(TailwiseError, match="magnitude only"):
        run_step(step, {"method": "wanda", "sparsity": 0.5},
                 {"model": digest, "calibration": store.put(text, "text").digest}, store=store)
    with pytest.raises(TailwiseError, match="sparsity"):
        run_step(step, {"method": "magnitude", "sparsity": 1.0}, {"model": digest},
                 store=store)
