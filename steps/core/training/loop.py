"""The one training loop (``fit``), for plain tensors and tokenised text alike.

    idx = low_data_indices(y_train, 0.1, seed=0)            # stratified 10 % subset
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = train(model, (x[idx], y[idx]), (x_val, y_val), optimizer=optimizer,
                    epochs=30, tempbalance={"rule": "linear"})

``fit`` takes a batch adapter per data kind (``batches.TensorBatches``, ``batches.Encoded``)
and implements once what every trainer needs: seeded shuffling, the lr schedule (per-epoch
cosine, or per-step linear with warmup: ``schedules``), TempBalance (per epoch or every K
steps), kept masks (pruned weights stay zero), per-epoch evaluation and records,
checkpoint/resume, and the timing. ``train`` is its tensor front.

The same model weights, data and seed give identical losses: batches are shuffled with a
seeded ``torch.Generator`` and the global torch RNG (dropout) is seeded at the start; a run
resumed from a checkpoint continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from steps.core.sparsity import keep_zeros, zero_masks
from steps.core.training.batches import Batches, Data, LossFn, TensorBatches, evaluate_batches
from steps.core.training.checkpoints import (
    Checkpointing,
    TrainingState,
    restore_checkpoint,
    save_checkpoint,
)
from steps.core.training.schedules import Schedule, Scheduler, check_schedule, make_scheduler
from steps.core.training.subsets import weighted_mean
from steps.core.training.tempbalance import TempBalance, TempBalanceRecord

__all__ = ["EpochRecord", "TrainHistory", "evaluate", "fit", "train"]

Task = Literal["classification", "regression"]
Callback = Callable[[int, dict[str, float]], None]
_METRIC_OF_TASK = {"classification": "accuracy", "regression": "nrmse"}


@dataclass
class EpochRecord:
    """One epoch's losses and, per balanced layer, the last alpha / lr factor / lr used."""

    epoch: int  # 0 = the initial state (alphas from the initial weights), then 1..epochs
    train_loss: float | None
    val_loss: float | None
    val_metric: float | None  # accuracy (classification) or nRMSE (regression)
    alphas: dict[str, float] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    lrs: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainHistory:
    """Epoch records (epoch 0 first), and where the time went."""

    metric: str  # "accuracy" (classification) or "nrmse" (regression)
    records: list[EpochRecord] = field(default_factory=list)
    resumed_from: int = 0  # last completed epoch found in a checkpoint (0: a fresh run)
    train_seconds: float = 0.0  # training passes + TempBalance steps (evaluation excluded)
    tempbalance_seconds: float = 0.0  # ESD recomputation and factor mapping
    tempbalance: list[TempBalanceRecord] = field(default_factory=list)

    @property
    def train_loss(self) -> list[float]:
        return [r.train_loss for r in self.records if r.train_loss is not None]

    @property
    def val_loss(self) -> list[float]:
        return [r.val_loss for r in self.records if r.val_loss is not None]

    @property
    def val_metric(self) -> list[float]:
        return [r.val_metric for r in self.records if r.val_metric is not None]

    @property
    def tempbalance_overhead(self) -> float:
        """Fraction of the training time spent in TempBalance's ESD recomputation."""
        return self.tempbalance_seconds / self.train_seconds if self.train_seconds else 0.0


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Batches,
    val_data: Batches | None,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    loss_fn: LossFn = nn.functional.cross_entropy,
    metric: str = "accuracy",
    eval_batch_size: int | None = None,
    schedule: Schedule = "cosine",
    warmup: float = 0.0,
    tempbalance: Mapping[str, Any] | None = None,
    balance_view: nn.Module | None = None,
    keep_mask: bool = False,
    checkpoints: Checkpointing | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    device: str = "cpu",
) -> TrainHistory:
    """Train ``model`` in place for ``epochs`` (from a checkpoint's epoch when resuming).

    train_data / val_data: batch adapters; without val_data no per-epoch evaluation.
    metric: "accuracy" or "nrmse" (``batches.METRICS``), evaluated with ``eval_batch_size``
        (default ``batch_size``).
    schedule: the global lr schedule (``schedules``): "cosine" (CosineAnnealingLR, T_max =
        epochs, stepped per epoch), "linear" (HF's linear decay to 0 after a linear warmup
        over the first ceil(warmup x all optimiser steps), stepped per optimiser step) or
        "constant".
    warmup: fraction of all optimiser steps spent warming up, in [0, 1); linear only.
    tempbalance: TempBalance options (e.g. {"rule": "linear"}), measured on
        ``balance_view`` (default the model). Factors are set from the initial weights and
        after every epoch, or every ``every_steps`` optimiser steps when that is given.
    keep_mask: weights of Linear / Conv layers that are exactly zero now stay zero (they are
        re-zeroed after every optimiser step).
    checkpoints: checkpoint after every epoch, and resume from the latest checkpoint.
    on_epoch: called after each epoch is checkpointed (a raise there leaves the checkpoint).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    check_schedule(schedule, warmup)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    steps_per_epoch = train_data.num_batches(batch_size) if schedule == "linear" else None
    scheduler = make_scheduler(optimizer, schedule, warmup, epochs, steps_per_epoch)
    step_scheduler = scheduler if schedule == "linear" else None
    epoch_scheduler = scheduler if schedule == "cosine" else None
    tb = None
    if tempbalance is not None:
        view = balance_view if balance_view is not None else model
        tb = TempBalance(view, optimizer, scheduler=scheduler, **tempbalance)
    if keep_mask:
        keep_zeros(optimizer, model, zero_masks(model))
    state = TrainingState(model, optimizer, scheduler, tb, generator)
    history = TrainHistory(metric=metric)

    start = time.perf_counter()
    found = checkpoints.found() if checkpoints is not None else None
    if found is not None:
        saved = restore_checkpoint(found, state, checkpoints)
        history.records = [EpochRecord(**r) for r in saved]
        history.resumed_from = history.records[-1].epoch
    else:
        if tb is not None:
            tb.step()
        history.records.append(_record(0, None, (None, None), tb, optimizer))
    per_step = tb if tb is not None and tb.every_steps is not None else None
    for epoch in range(history.resumed_from + 1, epochs + 1):
        model.train()
        losses = [_train_batch(model, optimizer, train_data, loss_fn, inputs, targets,
                               step_scheduler, per_step)
                  for inputs, targets in train_data.batches(batch_size, generator, device)]
        if epoch_scheduler is not None:
            epoch_scheduler.step()
        if tb is not None and per_step is None:
            tb.step()
        history.train_seconds += time.perf_counter() - start
        val = (None, None)
        if val_data is not None:
            val = evaluate_batches(model, val_data, loss_fn, metric,
                                   eval_batch_size or batch_size, device)
        history.records.append(_record(epoch, weighted_mean(losses), val, tb, optimizer))
        if checkpoints is not None and checkpoints.directory is not None:
            save_checkpoint(checkpoints.directory, epoch, history.records, state,
                            checkpoints.settings)
        if on_epoch is not None:
            on_epoch(history.records[-1])
        start = time.perf_counter()
    if tb is not None:
        history.tempbalance_seconds = tb.esd_seconds
        history.tempbalance = list(tb.history)
    return history


def train(
    model: nn.Module,
    train_data: Data,
    val_data: Data | None,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    task: Task = "classification",
    loss_fn: LossFn | None = None,
    batch_size: int = 64,
    seed: int = 0,
    schedule: Schedule = "cosine",
    warmup: float = 0.0,
    tempbalance: Mapping[str, Any] | None = None,
    keep_mask: bool = False,
    callback: Callback | None = None,
    device: str = "cpu",
) -> TrainHistory:
    """``fit`` on (inputs, targets) tensors (or DataLoaders); see ``fit``.

    train_data / val_data: tensors, batched and (train only) shuffled here, or DataLoaders
        used as given (seed their own generator for determinism). Without val_data there is
        no per-epoch evaluation (call ``evaluate`` at the end).
    task: "classification" (default loss cross-entropy, metric accuracy) or "regression"
        (default loss MSE, metric nRMSE).
    tempbalance: TempBalance options; the optimiser may hold one group for all parameters
        (TempBalance regroups it per layer) or come from ``layer_param_groups``.
    callback: called after each epoch with (epoch from 0, {"train_loss"[, "val_loss",
        metric]}).
    """
    if task not in _METRIC_OF_TASK:
        raise ValueError(f"unknown task {task!r}; choose 'classification' or 'regression'")
    if loss_fn is None:
        classify = task == "classification"
        loss_fn = nn.functional.cross_entropy if classify else nn.functional.mse_loss
    metric = _METRIC_OF_TASK[task]

    def on_epoch(record: EpochRecord) -> None:
        values = {"train_loss": record.train_loss}
        if val_data is not None:
            values |= {"val_loss": record.val_loss, metric: record.val_metric}
        callback(record.epoch - 1, values)

    return fit(model, optimizer, TensorBatches(train_data),
               TensorBatches(val_data) if val_data is not None else None, epochs=epochs,
               batch_size=batch_size, seed=seed, loss_fn=loss_fn, metric=metric, schedule=schedule,
               warmup=warmup, tempbalance=tempbalance, keep_mask=keep_mask,
               on_epoch=on_epoch if callback is not None else None, device=device)


def evaluate(
    model: nn.Module,
    data: Data,
    task: Task,
    loss_fn: LossFn,
    batch_size: int = 256,
    device: str = "cpu",
) -> tuple[float, float]:
    """(mean loss, accuracy or mean per-sample nRMSE) of the model on the data."""
    return evaluate_batches(model, TensorBatches(data), loss_fn, _METRIC_OF_TASK[task],
                            batch_size, device)


def _train_batch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Batches,
                 loss_fn: LossFn, inputs: Any, targets: torch.Tensor,
                 scheduler: Scheduler | None, tb: TempBalance | None) -> tuple[float, int]:
    """One optimiser step; then the per-step schedule and TempBalance (in the reference's
    order: the scheduler sets eta_t+1, TempBalance applies its factors to it)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(data.outputs(model, inputs), targets)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if tb is not None:
        tb.step()
    return float(loss.detach()), len(targets)


def _record(epoch: int, train_loss: float | None, val: tuple[float | None, float | None],
            tb: TempBalance | None, optimizer: torch.optim.Optimizer) -> EpochRecord:
    """The epoch's record; per layer TempBalance balances: alpha, factor and lr."""
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    if tb is None or not tb.history:
        return EpochRecord(epoch, train_loss, *val, lrs=lrs)
    last = tb.history[-1]
    balanced = [n for n, keep in zip(tb.layers, tb.included, strict=True) if keep and n in lrs]
    return EpochRecord(epoch, train_loss, *val,
                       alphas={n: last.alphas[n] for n in balanced},
                       factors={n: last.factors[n] for n in balanced},
                       lrs={n: lrs[n] for n in balanced})
