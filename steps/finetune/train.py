"""The tensor trainer, kept at its old import path: it lives in ``steps.core.training``."""

from steps.core.training import (
    TrainHistory,
    batches,
    evaluate,
    low_data_indices,
    nrmse,
    train,
    weighted_mean,
)

__all__ = ["TrainHistory", "batches", "evaluate", "low_data_indices", "nrmse", "train",
           "weighted_mean"]
