"""Plain model-zoo training: seeded, learns, uses the stratified subset, refuses bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from pydantic import BaseModel

from steps.core.errors import TailwiseError
from steps.core.factory import build_model, load_model, save_hf
from steps.core.step import Step, run_step
from steps.core.store import open_store
from steps.finetune.plain import finetune_plain_outputs, tempbalance_options, train_plain

FAST = {"batch_size": 32, "fraction": 0.5, "epochs": 4, "lr": 0.1}


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory):
    return save_hf(build_model("mlp", seed=0, width=16), None,
                   tmp_path_factory.mktemp("mlp") / "model")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_seeded_learns_and_uses_the_subset(mlp_dir):
    untrained = build_model("mlp", seed=0, width=16)
    model, metrics = train_plain(mlp_dir, "digits", seed=0, **FAST)
    again, same = train_plain(mlp_dir, "digits", seed=0, **FAST)
    other, different = train_plain(mlp_dir, "digits", seed=1, **FAST)
    assert same == metrics
    assert all(torch.equal(a, b) for a, b in zip(_state(model).values(),
                                                 _state(again).values(), strict=True))
    assert different != metrics
    # 50 % of digits' 1437 training images (the 80 % split), stratified.
    assert metrics["train_examples"] == 719  # floor(0.5 * 1437 + 0.5)
    assert metrics["test_accuracy"] > 0.5 and metrics["train_loss"] < 2.0
    with torch.no_grad():  # the directory's initial weights were trained, not replaced
        assert not torch.equal(untrained.layers[0].weight, model.layers[0].weight)


def test_cnn_and_tempbalance_train(tmp_path):
    cnn = save_hf(build_model("cnn", seed=0, width=4), None, tmp_path / "cnn")
    _, metrics = train_plain(cnn, "digits", seed=0, optimizer="adamw", **FAST | {"lr": 1e-2})
    assert metrics["test_accuracy"] > 0.3
    mlp = save_hf(build_model("mlp", seed=0, width=64), None, tmp_path / "mlp")
    _, balanced = train_plain(mlp, "digits", seed=0, tempbalance={"rule": "linear",
                                                              "exclude_first_last": False},
                             **FAST)
    _, plain = train_plain(mlp, "digits", seed=0, **FAST)
    assert balanced != plain


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": "mnist"}, "unknown labelled set"),
    ({"dataset": "iris"}, "4 input features but the mlp takes 64"),
    ({"fraction": 0.0}, "fraction"),
    ({"optimizer": "adam"}, "unknown optimizer"),
    ({"epochs": 0}, "must be positive"),
])
def test_bad_input_is_a_clear_error(mlp_dir, kwargs, message):
    args = {"dataset": "digits", "seed": 0, **FAST, **kwargs}
    with pytest.raises(TailwiseError, match=message):
        train_plain(mlp_dir, **args)


def test_cnn_refuses_a_set_without_images(tmp_path):
    cnn = save_hf(build_model("cnn", seed=0), None, tmp_path / "cnn")
    with pytest.raises(TailwiseError, match="8x8 images"):
        train_plain(cnn, "wine", seed=0, **FAST)


def test_tempbalance_options_from_finetune_params():
    assert tempbalance_options({"tempbalance": "none"}) is None
    assert tempbalance_options({"tempbalance": "linear", "tb_low": 0.6, "tb_high": 1.4}) == {
        "rule": "linear", "lr_range": (0.6, 1.4)}
    assert tempbalance_options({"tempbalance": "sigmoid", "tb_scale": 2.0,
                                "tb_every_steps": 5}) == {
        "rule": "sigmoid", "scale": 2.0, "scale_low": 2.0, "scale_high": 1.0, "every_steps": 5}
    # The reference's two scales (2 below the mean alpha, 1 above) unless one s is given.
    assert tempbalance_options({"tempbalance": "sigmoid"}) == {
        "rule": "sigmoid", "scale": None, "scale_low": 2.0, "scale_high": 1.0}


class PlainParams(BaseModel):
    dataset: str = "digits"
    batch_size: int = 32
    fraction: float = 0.25
    seed: int = 0
    epochs: int = 2
    lr: float = 0.05
    optimizer: str = "sgd"
    tempbalance: str = "none"


def _plain_step(ctx, params, inputs):
    return finetune_plain_outputs(ctx, params.model_dump(), inputs)


def test_finetune_plain_outputs_in_a_step(mlp_dir, tmp_path):
    step = Step("plain_test", "1", PlainParams, ("model",), _plain_step)
    store = open_store(str(tmp_path / "store"))
    model_ref = store.put(mlp_dir, "model").digest
    result = run_step(step, {}, {"model": model_ref}, store=store)
    assert set(result.outputs) == {"model", "metrics", "history"}
    trained = load_model(store.get(result.digests()["model"], tmp_path / "trained"))
    metrics = json.loads(store.get(result.digests()["metrics"], tmp_path / "m.json").read_text())
    history = pq.read_table(store.get(result.digests()["history"], tmp_path / "h.parquet"))
    assert history["epoch"].to_pylist() == [1, 2] and metrics["epochs"] == 2
    _, direct = train_plain(mlp_dir, "digits", seed=0, batch_size=32, fraction=0.25, epochs=2,
                            lr=0.05)
    assert metrics == pytest.approx(direct)
    assert trained.config.hidden == (16, 16)


def test_sigmoid_recomputes_alpha_every_tb_sigmoid_interval(tmp_path):
    """As on the HF path: without tb_every_steps, TB_Sigmoid recomputes alpha every
    min(100, steps_per_epoch / 10) optimiser steps, not once per epoch."""
    from steps.finetune.plain import run_plain

    mlp = save_hf(build_model("mlp", seed=0, width=64), None, tmp_path / "mlp")
    options = {"rule": "sigmoid", "by_block": False, "exclude_first_last": False}
    run = run_plain(mlp, "digits", seed=0, tempbalance=options, **FAST)
    steps = FAST["epochs"] * -(-run.metrics["train_examples"] // FAST["batch_size"])  # 4 x 23
    # The initial weights' alpha, then every max(1, 23 // 10) = 2 steps (per epoch: 1 + 4).
    assert len(run.history.tempbalance) == 1 + steps // 2
