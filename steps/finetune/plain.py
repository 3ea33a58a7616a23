"""Train a plain factory classifier (MLP / CNN) on a scikit-learn bundled set: the model zoo.

    model, metrics = train_plain("runs/mlp-w32", "digits", batch_size=32, fraction=0.5,
                                 seed=0, epochs=10, lr=0.05)

A model-zoo grid (width x batch size x data fraction x seed) trains many of these; the
diagnose step then measures their loss landscapes. The training subset is a stratified,
seeded low-data share of the train split (``low_data_indices``), the loop is
``steps.finetune.train.train`` (cosine lr, seeded shuffling), so the same model directory,
data and params give bit-identical weights.

Inputs: digits go to both models as 1x8x8 images scaled to [0, 1] (``digits_images``; the
MLP flattens them); the other sets (iris, wine, breast_cancer) as standardised feature
vectors (train-split mean and std), for an MLP built with a matching ``in_features``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from steps.core.data import LABELLED_SETS, digits_images, labelled_dataset
from steps.core.errors import ParamsError
from steps.core.factory import load_model, save_hf
from steps.core.factory import plain_kind as factory_plain_kind
from steps.core.sparsity import density, keep_zeros, zero_masks
from steps.core.step import Output, StepContext
from steps.finetune.tempbalance import layer_param_groups
from steps.finetune.train import TrainHistory, evaluate, low_data_indices, train

__all__ = ["PlainData", "PlainRun", "finetune_plain_outputs", "plain_data", "plain_kind",
           "run_plain", "train_plain", "training_subset"]

Batch = tuple[torch.Tensor, torch.Tensor]
OPTIMIZERS = ("sgd", "adamw")


class PlainModelError(ParamsError):
    """A plain-model input or training parameter that cannot be used."""


@dataclass(frozen=True)
class PlainData:
    """A labelled set as tensors shaped for one plain model."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def train(self) -> Batch:
        return self.x_train, self.y_train

    @property
    def test(self) -> Batch:
        return self.x_test, self.y_test


def plain_kind(model: nn.Module, what: str = "model") -> str:
    """'mlp' or 'cnn' for a factory model; a PlainModelError naming ``what`` otherwise."""
    kind = factory_plain_kind(model)
    if kind is not None:
        return kind
    raise PlainModelError(f"{what}: a {type(model).__name__} is not a plain factory classifier "
                          f"(mlp or cnn)")


def _standardised(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)  # constant features stay 0 rather than NaN
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def plain_data(dataset: str, model: nn.Module, split_seed: int = 0) -> PlainData:
    """The train/test split of a scikit-learn set (``labelled_dataset``) shaped for ``model``."""
    if dataset not in LABELLED_SETS:
        raise PlainModelError(f"dataset: unknown labelled set {dataset!r}; choose one of "
                              f"{', '.join(LABELLED_SETS)}")
    kind = plain_kind(model)
    data = labelled_dataset(dataset, seed=split_seed)
    if dataset == "digits":
        x_train, x_test = digits_images(data.x_train), digits_images(data.x_test)
    elif kind == "cnn":
        raise PlainModelError(f"dataset: the cnn takes 8x8 images (digits), not {dataset!r}")
    else:
        x_train, x_test = _standardised(data.x_train, data.x_test)
    features = int(np.prod(x_train.shape[1:]))
    expected = model.config.in_features if kind == "mlp" else (
        model.config.in_channels * model.config.image_size ** 2)
    if features != expected:
        raise PlainModelError(f"dataset: {dataset!r} has {features} input features but the "
                              f"{kind} takes {expected}")
    if data.num_classes > model.config.num_classes:
        raise PlainModelError(f"dataset: {dataset!r} has {data.num_classes} classes but the "
                              f"{kind} outputs {model.config.num_classes}")
    return PlainData(dataset, torch.from_numpy(x_train), torch.from_numpy(data.y_train),
                     torch.from_numpy(x_test), torch.from_numpy(data.y_test), data.num_classes)


def training_subset(data: PlainData, fraction: float, seed: int) -> Batch:
    """The stratified, seeded low-data share of the train split a zoo model is trained on."""
    try:
        idx = torch.from_numpy(low_data_indices(data.y_train.numpy(), fraction, seed=seed))
    except ValueError as exc:
        raise PlainModelError(f"fraction: {exc}") from exc
    return data.x_train[idx], data.y_train[idx]


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
              weight_decay: float = 0.0, split_seed: int = 0,
              keep_mask: bool = False) -> PlainRun:
    """Train the model in ``model_dir`` on ``fraction`` of the ``dataset`` train split.

    ``seed`` draws the subset and seeds the batch order; the initial weights are the
    directory's (a zoo varies them with build_model's seed). Per epoch the test split is
    evaluated (the history's val columns); ``tempbalance`` passes TempBalance options.
    ``keep_mask``: the Linear / Conv weights that are exactly zero in the directory (a
    pruned model) are set back to zero after every optimiser step, so the retrained model
    keeps the pruned model's mask; the metrics then include its ``density``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise PlainModelError(f"epochs, batch_size and lr must be positive, got {epochs}, "
                              f"{batch_size} and {lr}")
    model = load_model(model_dir)
    data = plain_data(dataset, model, split_seed)
    subset = training_subset(data, fraction, seed)
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay, tempbalance is not None)
    if keep_mask:
        keep_zeros(opt, model, zero_masks(model))
    history = train(model, subset, data.test, optimizer=opt, epochs=epochs,
                    batch_size=batch_size, seed=seed, tempbalance=tempbalance)
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
        options = {"rule": "sigmoid", "scale": params.get("tb_scale", 1.0)}
    else:
        raise PlainModelError(f"tempbalance: unknown rule {rule!r}; choose none, linear or "
                              f"sigmoid")
    if params.get("tb_every_steps") is not None:
        options["every_steps"] = params["tb_every_steps"]
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
                    keep_mask=params.get("keep_mask", False))
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
