"""A compact, seeded training loop for classifiers and regressors, with optional TempBalance.

    idx = low_data_indices(y_train, 0.1, seed=0)            # stratified 10 % subset
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.05), lr=0.05, momentum=0.9)
    history = train(model, (x[idx], y[idx]), (x_val, y_val), optimizer=optimizer,
                    epochs=30, tempbalance={"rule": "linear"})

The same model weights, data and seed give identical losses: batches are shuffled with a
seeded ``torch.Generator`` and the global torch RNG (dropout) is seeded at the start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from steps.finetune.tempbalance import TempBalance, TempBalanceRecord

__all__ = ["TrainHistory", "batches", "evaluate", "low_data_indices", "nrmse", "train",
           "weighted_mean"]

Task = Literal["classification", "regression"]
Data = tuple[torch.Tensor, torch.Tensor] | DataLoader
Callback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainHistory:
    """Per-epoch losses and validation metric, and where the time went."""

    metric: str  # "accuracy" (classification) or "nrmse" (regression)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_metric: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # training passes + TempBalance steps (evaluation excluded)
    tempbalance_seconds: float = 0.0  # ESD recomputation and factor mapping
    tempbalance: list[TempBalanceRecord] = field(default_factory=list)

    @property
    def tempbalance_overhead(self) -> float:
        """Fraction of the training time spent in TempBalance's ESD recomputation."""
        return self.tempbalance_seconds / self.train_seconds if self.train_seconds else 0.0


def train(
    model: nn.Module,
    train_data: Data,
    val_data: Data | None,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    task: Task = "classification",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    cosine: bool = True,
    tempbalance: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    device: str = "cpu",
) -> TrainHistory:
    """Train ``model`` in place for ``epochs`` and return its history.

    train_data / val_data: (inputs, targets) tensors, batched and (train only) shuffled
        here, or DataLoaders used as given (seed their own generator for determinism).
        Without val_data there is no per-epoch evaluation (call ``evaluate`` at the end).
    task: "classification" (default loss cross-entropy, metric accuracy) or "regression"
        (default loss MSE, metric nRMSE).
    cosine: a per-epoch cosine schedule (CosineAnnealingLR, T_max = epochs) on the lr.
    tempbalance: TempBalance options (e.g. {"rule": "linear"}); the optimiser's param groups
        must come from ``layer_param_groups``. Factors are set from the initial weights and
        after every epoch, or every ``every_steps`` optimiser steps when that is given.
    callback: called after each epoch with (epoch, {"train_loss"[, "val_loss", metric]}).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if task not in ("classification", "regression"):
        raise ValueError(f"unknown task {task!r}; choose 'classification' or 'regression'")
    if loss_fn is None:
        classify = task == "classification"
        loss_fn = nn.functional.cross_entropy if classify else nn.functional.mse_loss
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if cosine else None
    tb = None
    if tempbalance is not None:
        tb = TempBalance(model, optimizer, scheduler=scheduler, **tempbalance)
    history = TrainHistory(metric="accuracy" if task == "classification" else "nrmse")

    start = time.perf_counter()
    if tb is not None:
        tb.step()
    for epoch in range(epochs):
        model.train()
        per_step = tb if tb is not None and tb.every_steps is not None else None
        losses = [
            _train_batch(model, optimizer, loss_fn, x.to(device), y.to(device), per_step)
            for x, y in batches(train_data, batch_size, generator)
        ]
        if scheduler is not None:
            scheduler.step()
        if tb is not None and per_step is None:
            tb.step()
        history.train_seconds += time.perf_counter() - start
        history.train_loss.append(weighted_mean(losses))
        record = {"train_loss": history.train_loss[-1]}
        if val_data is not None:
            val_loss, val_metric = evaluate(model, val_data, task, loss_fn, batch_size, device)
            history.val_loss.append(val_loss)
            history.val_metric.append(val_metric)
            record |= {"val_loss": val_loss, history.metric: val_metric}
        if callback is not None:
            callback(epoch, record)
        start = time.perf_counter()
    if tb is not None:
        history.tempbalance_seconds = tb.esd_seconds
        history.tempbalance = list(tb.history)
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data,
    task: Task,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    device: str = "cpu",
) -> tuple[float, float]:
    """(mean loss, accuracy or mean per-sample nRMSE) of the model on the data."""
    model.eval()
    losses, scores = [], []
    for x, y in batches(data, batch_size, None):
        x, y = x.to(device), y.to(device)
        out = model(x)
        losses.append((float(loss_fn(out, y)), len(x)))
        if task == "classification":
            scores.append((float((out.argmax(1) == y).float().mean()), len(x)))
        else:
            scores.append((float(nrmse(out, y).mean()), len(x)))
    return weighted_mean(losses), weighted_mean(scores)


def nrmse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample normalised RMSE, ||prediction - target||_2 / ||target||_2 (PDEBench's)."""
    diff = (prediction - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1)


def low_data_indices(
    labels_or_size: int | np.ndarray | torch.Tensor, fraction: float, *, seed: int
) -> np.ndarray:
    """Sorted indices of a seeded low-data subset holding ``fraction`` of the samples.

    Given class labels the subset is stratified: each class gets its share of
    round(fraction * n) by largest remainder (ties to the lower class); given a size n
    (regression), a uniform random subset. At least one sample is kept.
    """
    if not 0.0 < fraction <= 1.0:  # NaN fails too
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    rng = np.random.default_rng(seed)
    if isinstance(labels_or_size, int | np.integer):
        size = labels_or_size
        chosen = rng.permutation(size)[: _subset_size(size, fraction)]
        return np.sort(chosen).astype(np.int64)
    labels = np.asarray(labels_or_size)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    take = np.floor(quotas).astype(np.int64)
    missing = _subset_size(len(labels), fraction) - int(take.sum())
    take[np.argsort(-(quotas - take), kind="stable")[:missing]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == cls))[:k]
        for cls, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _subset_size(n: int, fraction: float) -> int:
    if n < 1:
        raise ValueError(f"cannot take a subset of {n} samples")
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def _train_batch(model, optimizer, loss_fn, x, y, tb: TempBalance | None) -> tuple[float, int]:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    if tb is not None:
        tb.step()
    return float(loss.detach()), len(x)


def batches(
    data: Data, batch_size: int, generator: torch.Generator | None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of (inputs, targets); shuffled with ``generator`` when it is given."""
    if isinstance(data, DataLoader):
        return data
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
    if generator is None:
        order = torch.arange(len(x))
    else:
        order = torch.randperm(len(x), generator=generator)
    return ((x[i], y[i]) for i in order.split(batch_size))


def weighted_mean(values: list[tuple[float, int]]) -> float:
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else float("nan")
