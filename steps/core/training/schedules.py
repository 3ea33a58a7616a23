"""The global learning-rate schedules of the training loop (``loop.fit``).

- ``cosine``: CosineAnnealingLR over the epochs (T_max = epochs), stepped once per epoch.
- ``linear``: HF Trainer's ``get_linear_schedule_with_warmup``, stepped after every
  optimiser step: the lr ramps 0 -> lr over the first ceil(warmup * total) steps, then decays
  linearly to 0 at step total (= epochs x batches per epoch). The TB_Sigmoid fine-tuning
  code (ZihangHLiu/ModelBalancing) trains with it, warmup ratio 0.06.
- ``constant``: no scheduler; the optimiser's lr throughout.

Schedulers are torch ``LambdaLR`` / ``CosineAnnealingLR``, so TempBalance can wrap them
(``TempBalance(..., scheduler=...)``) and checkpoints save their ``state_dict``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch

from steps.core.errors import TailwiseError

__all__ = ["SCHEDULES", "Schedule", "ScheduleError", "check_schedule", "linear_warmup_factor",
           "make_scheduler"]

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
Scheduler = torch.optim.lr_scheduler.LRScheduler


class ScheduleError(TailwiseError, ValueError):
    """An unknown schedule or a warmup out of range."""


def check_schedule(schedule: str, warmup: float) -> None:
    """Raise ScheduleError unless ``schedule`` is known and 0 <= warmup < 1 (linear only)."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"schedule: unknown schedule {schedule!r}; choose one of "
                            f"{', '.join(SCHEDULES)}")
    if not (isinstance(warmup, int | float) and 0.0 <= warmup < 1.0):
        raise ScheduleError(f"warmup must be a fraction of the optimiser steps in [0, 1), "
                            f"got {warmup!r}")
    if warmup > 0 and schedule != "linear":
        raise ScheduleError(f"warmup ({warmup:g}) is for the linear schedule only, not "
                            f"{schedule!r}")


def linear_warmup_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The lr multiplier after ``step`` optimiser steps (HF's linear schedule with warmup)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, warmup: float,
                   epochs: int, steps_per_epoch: int | None) -> Scheduler | None:
    """The scheduler of ``schedule`` on the optimiser (None for constant).

    steps_per_epoch: optimiser steps per epoch, needed by ``linear`` only.
    """
    check_schedule(schedule, warmup)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    if schedule == "constant":
        return None
    total = epochs * steps_per_epoch
    factor = partial(linear_warmup_factor, warmup_steps=math.ceil(warmup * total),
                     total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
