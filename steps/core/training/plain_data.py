"""Plain factory classifiers (MLP / CNN) and the scikit-learn sets they are trained on.

    data = plain_data("digits", model)                  # train / test split shaped for it
    x, y = training_subset(data, fraction=0.5, seed=0)  # the seeded low-data share

Inputs: digits go to both models as 1x8x8 images scaled to [0, 1] (``digits_images``; the
MLP flattens them); the other sets (iris, wine, breast_cancer) as standardised feature
vectors (train-split mean and std), for an MLP built with a matching ``in_features``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from steps.core.data import LABELLED_SETS, digits_images, labelled_dataset
from steps.core.errors import ParamsError
from steps.core.factory import plain_kind as factory_plain_kind
from steps.core.training.subsets import low_data_indices

__all__ = ["PlainData", "PlainModelError", "plain_data", "plain_kind", "training_subset"]

Batch = tuple[torch.Tensor, torch.Tensor]


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
