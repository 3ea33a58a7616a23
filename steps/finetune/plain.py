"""Train a plain factory classifier (MLP / CNN) on a scikit-learn bundled set: the model zoo.

    model, metrics = train_plain("runs/mlp-w32", "digits", batch_size=32, fraction=0.5,
                                 seed=0, epochs=10, lr=0.05)

A model-zoo grid (width x batch size x data fraction x seed) trains many of these; the
diagnose step then measures their loss landscapes. The data and the stratified, seeded
low-data subset come from ``steps.core.training.plain_data``, the loop is
``steps.core.training.train`` (cosine lr by default, seeded shuffling), so the same model
directory, data and params give bit-identical weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from steps.core.factory import load_model, save_hf
from steps.core.farms import IMAGE_CLASSIFICATION_OPTIONS
from steps.core.sparsity import density
from steps.core.step import Output, StepContext
from steps.core.training import (
    PlainData,
    PlainModelError,
    Schedule,
    TrainHistory,
    evaluate,
    layer_param_groups,
    plain_data,
    plain_kind,
    train,
    training_subset,
    with_default_interval,
)

__all__ = ["PlainData", "PlainRun", "finetune_plain_outputs", "plain_data", "plain_kind",
           "run_plain", "train_plain", "training_subset"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class PlainRun:
    """A trained plain model, its final metrics and its per-epoch history."""

    model: nn.Module
    metrics: dict[str, float]
    history: TrainHistory


def _optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
               balanced: bool) -> torch.optim.Optimizer:
    # TempBalance scales each layer's lr, so it needs one param group per layer.
    params = layer_param_groups(model, lr) if balanced else model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise PlainModelError(f"optimizer: unknown optimizer {name!r}; choose one of "
                          f"{', '.join(OPTIMIZERS)}")


def run_plain(model_dir: str | Path, dataset: str = "digits", *, batch_size: int,
              fraction: float, seed: int, epochs: int, lr: float, optimizer: str = "sgd",
              tempbalance: dict[str, Any] | None = None, momentum: float = 0.9,
              weight_decay: float = 0.0, split_seed: int = 0, keep_mask: bool = False,
              schedule: Schedule = "cosine", warmup: float = 0.0) -> PlainRun:
    """Train the model in ``model_dir`` on ``fraction`` of the ``dataset`` train split.

    ``seed`` draws the subset and seeds the batch order; the initial weights are the
    directory's (a zoo varies them with build_model's seed). Per epoch the test split is
    evaluated (the history's val columns); ``tempbalance`` passes TempBalance options.
    ``keep_mask``: the Linear / Conv weights that are exactly zero in the directory (a
    pruned model) are set back to zero after every optimiser step, so the retrained model
    keeps the pruned model's mask; the metrics then include its ``density``. ``schedule`` /
    ``warmup``: the lr schedule (``steps.core.training.schedules``).
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise PlainModelError(f"epochs, batch_size and lr must be positive, got {epochs}, "
                              f"{batch_size} and {lr}")
    model = load_model(model_dir)
    data = plain_data(dataset, model, split_seed)
    subset = training_subset(data, fraction, seed)
    if tempbalance is not None:
        tempbalance = with_default_interval(tempbalance, math.ceil(len(subset[1]) / batch_size))
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay, tempbalance is not None)
    history = train(model, subset, data.test, optimizer=opt, epochs=epochs,
                    batch_size=batch_size, seed=seed, schedule=schedule, warmup=warmup,
                    tempbalance=tempbalance, keep_mask=keep_mask)
    model.eval()
    train_loss, train_accuracy = evaluate(model, subset, "classification", F.cross_entropy)
    test_loss, test_accuracy = evaluate(model, data.test, "classification", F.cross_entropy)
    metrics = {"train_examples": len(subset[1]), "epochs": epochs,
               "train_loss": train_loss, "train_accuracy": train_accuracy,
               "test_loss": test_loss, "test_accuracy": test_accuracy}
    if keep_mask:
        metrics["density"] = density(model)
    return PlainRun(model, metrics, history)


def train_plain(model_dir: str | Path, dataset: str = "digits", *, batch_size: int,
                fraction: float, seed: int, epochs: int, lr: float, optimizer: str = "sgd",
                tempbalance: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, float]]:
    """(trained model, final metrics); see ``run_plain``."""
    run = run_plain(model_dir, dataset, batch_size=batch_size, fraction=fraction, seed=seed,
                    epochs=epochs, lr=lr, optimizer=optimizer, tempbalance=tempbalance)
    return run.model, run.metrics


def history_table(history: TrainHistory) -> pa.Table:
    """One row per epoch (1-based): train loss, test loss and test accuracy."""
    epochs = len(history.train_loss)
    return pa.table({"epoch": pa.array(range(1, epochs + 1), pa.int64()),
                     "train_loss": pa.array(history.train_loss, pa.float64()),
                     "test_loss": pa.array(history.val_loss, pa.float64()),
                     "test_accuracy": pa.array(history.val_metric, pa.float64())})


def tempbalance_options(params: dict[str, Any]) -> dict[str, Any] | None:
    """TempBalance options from the finetune step's tempbalance / tb_* params (None: off)."""
    rule = params.get("tempbalance", "none")
    if rule in (None, "none"):
        return None
    if rule == "linear":
        options = {"rule": "linear", "lr_range": (params.get("tb_low", 0.5),
                                                  params.get("tb_high", 1.5))}
    elif rule == "sigmoid":
        options = {"rule": "sigmoid", "scale": params.get("tb_scale"),
                   "scale_low": params.get("tb_scale_low", 2.0),
                   "scale_high": params.get("tb_scale_high", 1.0)}
    else:
        raise PlainModelError(f"tempbalance: unknown rule {rule!r}; choose none, linear or "
                              f"sigmoid")
    if params.get("tb_every_steps") is not None:
        options["every_steps"] = params["tb_every_steps"]
    if params.get("tb_farms"):
        options["farms"] = IMAGE_CLASSIFICATION_OPTIONS
    return options


def finetune_plain_outputs(ctx: StepContext, params: dict[str, Any],
                           inputs: dict[str, Path]) -> dict[str, Output]:
    """The finetune step for a plain model on a scikit-learn set: model, metrics, history.

    ``params`` is the finetune step's params as a dict (``FinetuneParams.model_dump()``);
    the text-only ones (lora, max_length, ...) are ignored.
    """
    run = run_plain(inputs["model"], params["dataset"], batch_size=params["batch_size"],
                    fraction=params.get("fraction", 1.0), seed=params.get("seed", 0),
                    epochs=params["epochs"], lr=params["lr"],
                    optimizer=params.get("optimizer", "sgd"),
                    tempbalance=tempbalance_options(params),
                    weight_decay=params.get("weight_decay", 0.0),
                    split_seed=params.get("split_seed", 0),
                    keep_mask=params.get("keep_mask", False),
                    schedule=params.get("schedule", "cosine"),
                    warmup=params.get("warmup", 0.0))
    ctx.log_metrics(run.metrics)
    model_dir = save_hf(run.model, None, ctx.workdir / "model")
    metrics_path = ctx.workdir / "metrics.json"
    metrics_path.write_text(json.dumps(run.metrics, indent=1, sort_keys=True) + "\n")
    history_path = ctx.workdir / "history.parquet"
    pq.write_table(history_table(run.history), history_path)
    return {"model": Output(model_dir, "model"),
            "metrics": Output(metrics_path, "metrics", "application/json"),
            "history": Output(history_path, "finetune-history",
                              "application/vnd.apache.parquet")}
