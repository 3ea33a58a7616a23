"""Batch adapters: how the one training loop (``loop.fit``) draws, feeds and scores a kind of
data. Plain tensors (``TensorBatches``: (inputs, targets) or a DataLoader) and tokenised text
(``Encoded``: token ids and labels, padded per batch) each give

- ``batches(batch_size, generator, device)``: (inputs, targets) on the device, shuffled by
  ``generator`` (a seeded ``torch.randperm`` over the examples) or in order when it is None;
- ``outputs(model, inputs)``: what the loss and metric read (logits, or predictions);
- ``num_batches(batch_size)``: batches per epoch (a per-step lr schedule's length).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from steps.core.training.subsets import nrmse, weighted_mean

__all__ = ["Batches", "Data", "Encoded", "METRICS", "TensorBatches", "batches", "encode",
           "evaluate_batches", "evaluate_classifier"]

Data = tuple[torch.Tensor, torch.Tensor] | DataLoader
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Batches(Protocol):
    def batches(self, batch_size: int, generator: torch.Generator | None,
                device: str) -> Iterable[tuple[Any, torch.Tensor]]: ...

    def outputs(self, model: nn.Module, inputs: Any) -> torch.Tensor: ...

    def num_batches(self, batch_size: int) -> int: ...


def _accuracy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == target).float().mean()


def _mean_nrmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nrmse(out, target).mean()


METRICS: dict[str, LossFn] = {"accuracy": _accuracy, "nrmse": _mean_nrmse}


def batches(data: Data, batch_size: int,
            generator: torch.Generator | None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of (inputs, targets); shuffled with ``generator`` when it is given."""
    if isinstance(data, DataLoader):
        return data
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
    return ((x[i], y[i]) for i in _order(len(x), generator).split(batch_size))


def _order(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.arange(n) if generator is None else torch.randperm(n, generator=generator)


@dataclass(frozen=True)
class TensorBatches:
    """(inputs, targets) tensors, or a DataLoader used as given (it seeds its own order)."""

    data: Data

    def batches(self, batch_size: int, generator: torch.Generator | None,
                device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in batches(self.data, batch_size, generator):
            yield x.to(device), y.to(device)

    def outputs(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def num_batches(self, batch_size: int) -> int:
        if isinstance(self.data, DataLoader):
            return len(self.data)
        return math.ceil(len(self.data[0]) / batch_size)


@dataclass(frozen=True)
class Encoded:
    """Token ids of every text (unpadded) and the labels: the adapter of tokenised text."""

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int

    def batches(self, batch_size: int, generator: torch.Generator | None,
                device: str) -> Iterator[tuple[dict, torch.Tensor]]:
        for idx in _order(len(self.labels), generator).split(batch_size):
            yield self.collate(idx, device)

    def collate(self, idx: torch.Tensor, device: str) -> tuple[dict, torch.Tensor]:
        """Right-padded ids and attention mask of the chosen examples (to the longest)."""
        rows = [self.ids[i] for i in idx.tolist()]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row)
            mask[i, : len(row)] = 1
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        return batch, self.labels[idx].to(device)

    def outputs(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(**inputs).logits

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.labels) / batch_size)


def encode(tokenizer, split: tuple[list[str], Any], max_length: int) -> Encoded:
    """Token ids of every text (the model's own tokenizer, truncated), and the labels."""
    texts, labels = split
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, torch.as_tensor(labels, dtype=torch.long), int(tokenizer.pad_token_id))


@torch.no_grad()
def evaluate_batches(model: nn.Module, data: Batches, loss_fn: LossFn, metric: str,
                     batch_size: int, device: str = "cpu") -> tuple[float, float]:
    """(mean loss, mean metric) of the model over the data, in order, in eval mode."""
    model.eval()
    score = METRICS[metric]
    losses, scores = [], []
    for inputs, targets in data.batches(batch_size, None, device):
        out = data.outputs(model, inputs)
        losses.append((float(loss_fn(out, targets)), len(targets)))
        scores.append((float(score(out, targets)), len(targets)))
    return weighted_mean(losses), weighted_mean(scores)


def evaluate_classifier(model: nn.Module, data: Encoded, device: str = "cpu",
                        batch_size: int = 64) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a sequence classifier over encoded examples."""
    return evaluate_batches(model, data, nn.functional.cross_entropy, "accuracy", batch_size,
                            device)
