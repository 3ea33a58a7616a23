"""Mask-preserving retraining: a pruned plain model's zeros stay exactly zero (keep_mask)."""

from __future__ import annotations

import json

import pytest
import torch

from steps.core.errors import TailwiseError
from steps.core.factory import build_model, load_model, save_hf
from steps.core.registry import load_step
from steps.core.sparsity import density, prunable_weights, zero_masks
from steps.core.step import run_step
from steps.core.store import open_store
from steps.finetune.plain import run_plain
from steps.prune.plain import prune_plain

RETRAIN = {"batch_size": 32, "fraction": 1.0, "epochs": 2, "lr": 0.2}


def pruned_dir(root, name: str = "mlp", sparsity: float = 0.9):
    """A trained plain model, globally magnitude-pruned, saved as a model directory."""
    start = save_hf(build_model(name, seed=0, width=8), None, root / f"{name}-init")
    model = run_plain(start, "digits", seed=0, **RETRAIN).model
    prune_plain(model, sparsity=sparsity)
    return save_hf(model, None, root / f"{name}-pruned")


@pytest.fixture(scope="module")
def pruned_mlp(tmp_path_factory):
    return pruned_dir(tmp_path_factory.mktemp("pruned"))


def _same_mask(a, b) -> bool:
    ma, mb = zero_masks(a), zero_masks(b)
    return all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize(("optimizer", "weight_decay"), [("sgd", 0.0), ("sgd", 1e-3),
                                                         ("adamw", 1e-2)])
def test_keep_mask_keeps_every_zero_and_trains_the_rest(pruned_mlp, optimizer, weight_decay):
    pruned = load_model(pruned_mlp)
    lr = 0.2 if optimizer == "sgd" else 1e-2
    run = run_plain(pruned_mlp, "digits", seed=1, optimizer=optimizer,
                    weight_decay=weight_decay, keep_mask=True, **RETRAIN | {"lr": lr})
    assert _same_mask(run.model, pruned)  # zeros exactly where they were, and only there
    assert run.metrics["density"] == density(pruned) == pytest.approx(0.1, abs=1e-3)
    moved = [not torch.equal(w, prunable_weights(pruned)[k])
             for k, w in prunable_weights(run.model).items()]
    assert all(moved)  # the surviving weights were trained


def test_without_keep_mask_the_pruned_weights_grow_back(pruned_mlp):
    run = run_plain(pruned_mlp, "digits", seed=1, **RETRAIN)
    # Not all: weights of always-blank digit pixels and of dead units get no gradient.
    assert density(run.model) > 5 * density(load_model(pruned_mlp))
    assert "density" not in run.metrics


def test_the_cnn_keeps_its_mask_and_seeds_order_the_batches(tmp_path):
    path = pruned_dir(tmp_path, "cnn", sparsity=0.8)
    runs = [run_plain(path, "digits", seed=seed, keep_mask=True, **RETRAIN)
            for seed in (0, 0, 1)]
    assert all(_same_mask(r.model, load_model(path)) for r in runs)
    first, again, other = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed: same weights
    assert any(not torch.equal(first[k], other[k]) for k in first)  # other batch order


def test_the_finetune_step_keeps_the_mask_and_refuses_it_for_text(pruned_mlp, tmp_path):
    store = open_store(str(tmp_path / "store"))
    digest = store.put(pruned_mlp, "model").digest
    step = load_step("finetune")
    params = {"dataset": "digits", "optimizer": "sgd", "keep_mask": True, "seed": 2,
              "epochs": 2, "batch_size": 32, "lr": 0.2}
    result = run_step(step, params, {"model": digest}, store=store)
    model = load_model(store.get(result.digests()["model"], tmp_path / "model"))
    assert _same_mask(model, load_model(pruned_mlp))
    metrics = json.loads(store.get(result.digests()["metrics"], tmp_path / "m.json")
                         .read_text())
    assert metrics["density"] == density(model)
    with pytest.raises(TailwiseError, match="keep_mask is for plain models"):
        run_step(step, params | {"dataset": "fortunes"}, {"model": digest}, store=store)
    with pytest.raises(TailwiseError, match="keep_mask is for plain models"):
        run_step(step, {"keep_mask": True}, {"model": digest, "data": digest}, store=store)
