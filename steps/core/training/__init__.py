"""The trainer every step shares: one loop for plain tensors and tokenised text, TempBalance,
checkpoints, and the data helpers the finetune, diagnose and evaluate steps all use.

    history = train(model, (x, y), (x_val, y_val), optimizer=opt, epochs=10,
                    tempbalance={"rule": "linear"})        # tensors
    history = fit(model, opt, encode(tokenizer, split, 128), None, epochs=3, batch_size=16,
                  checkpoints=Checkpointing(Path("ckpt"), settings))  # tokenised text

Start reading at ``loop.fit``; ``batches`` holds the adapter per data kind, ``schedules``
the global lr schedule, ``tempbalance`` the per-layer learning rates, ``checkpoints`` resume,
``plain_data`` / ``text`` the data.
"""

from steps.core.training.batches import (
    Batches,
    Encoded,
    TensorBatches,
    batches,
    encode,
    evaluate_batches,
    evaluate_classifier,
)
from steps.core.training.checkpoints import CheckpointError, Checkpointing, latest_checkpoint
from steps.core.training.loop import EpochRecord, TrainHistory, evaluate, fit, train
from steps.core.training.plain_data import (
    PlainData,
    PlainModelError,
    plain_data,
    plain_kind,
    training_subset,
)
from steps.core.training.schedules import SCHEDULES, Schedule, ScheduleError
from steps.core.training.subsets import low_data_indices, nrmse, weighted_mean
from steps.core.training.tempbalance import (
    TempBalance,
    TempBalanceError,
    TempBalanceRecord,
    layer_param_groups,
    sigmoid_interval,
    with_default_interval,
)

__all__ = [
    "SCHEDULES",
    "Batches",
    "CheckpointError",
    "Checkpointing",
    "Encoded",
    "EpochRecord",
    "PlainData",
    "PlainModelError",
    "Schedule",
    "ScheduleError",
    "TempBalance",
    "TempBalanceError",
    "TempBalanceRecord",
    "TensorBatches",
    "TrainHistory",
    "batches",
    "encode",
    "evaluate",
    "evaluate_batches",
    "evaluate_classifier",
    "fit",
    "latest_checkpoint",
    "layer_param_groups",
    "low_data_indices",
    "nrmse",
    "plain_data",
    "plain_kind",
    "sigmoid_interval",
    "train",
    "training_subset",
    "weighted_mean",
    "with_default_interval",
]

