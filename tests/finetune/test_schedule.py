"""The loop's lr schedules: the per-step linear schedule is HF's get_linear_schedule_with_warmup
(the TB_Sigmoid paper's harness), cosine stays per epoch, TempBalance scales the scheduled
lr, a resumed run equals the uninterrupted one, and bad settings are refused."""

from __future__ import annotations

import math

import pytest
import torch

from steps.core.factory import build_model
from steps.core.training import Checkpointing, TensorBatches, fit, train
from steps.core.training.schedules import ScheduleError

torch.set_num_threads(1)

LR = 0.01
EXAMPLES, BATCH = 40, 8  # 5 optimiser steps per epoch


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(EXAMPLES, 1, 8, 8, generator=gen), torch.randint(0, 10, (EXAMPLES,),
                                                                        generator=gen)


def _hf_linear_with_warmup(step: int, warmup_ratio: float, total: int) -> float:
    """transformers' get_linear_schedule_with_warmup multiplier, with the Trainer's
    warmup steps ceil(ratio x total), written out here from their code."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _lrs_per_step(optimizer: torch.optim.Optimizer) -> list[list[float]]:
    """Filled with every group's lr as each optimiser step starts."""
    seen: list[list[float]] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    return seen


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


@pytest.mark.parametrize("warmup", [0.0, 0.06, 0.3])
def test_linear_schedule_is_hf_linear_with_warmup_per_step(warmup):
    epochs = 4
    model = build_model("cnn", seed=0)
    optimizer = _adamw(model)
    seen = _lrs_per_step(optimizer)
    history = train(model, _data(), None, optimizer=optimizer, epochs=epochs,
                    batch_size=BATCH, schedule="linear", warmup=warmup)
    total = epochs * EXAMPLES // BATCH
    expected = [LR * _hf_linear_with_warmup(s, warmup, total) for s in range(total)]
    assert [lrs[0] for lrs in seen] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert history.records[-1].lrs == {"0": 0.0}  # decayed to 0 at the last step
    if warmup:
        assert seen[0] == [0.0] and max(lr for lrs in seen for lr in lrs) == pytest.approx(LR)


def test_cosine_stays_per_epoch():
    epochs = 3
    model = build_model("cnn", seed=0)
    optimizer = _adamw(model)
    seen = _lrs_per_step(optimizer)
    train(model, _data(), None, optimizer=optimizer, epochs=epochs, batch_size=BATCH)
    per_epoch = [LR * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    expected = [lr for lr in per_epoch for _ in range(EXAMPLES // BATCH)]
    assert [lrs[0] for lrs in seen] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("every_steps", [None, 3], ids=["per-epoch", "every-3-steps"])
def test_tempbalance_scales_the_linear_schedule(every_steps):
    """Each group's lr at every optimiser step is eta_t (the HF formula) x its layer's
    factor from the last ESD recomputation before that step."""
    epochs, warmup = 3, 0.2
    steps_per_epoch = EXAMPLES // BATCH
    total = epochs * steps_per_epoch
    model = build_model("cnn", seed=0)
    optimizer = _adamw(model)  # one group: TempBalance regroups it and expands the scheduler
    seen = _lrs_per_step(optimizer)
    history = train(model, _data(), None, optimizer=optimizer, epochs=epochs,
                    batch_size=BATCH, schedule="linear", warmup=warmup,
                    tempbalance={"rule": "sigmoid", "by_block": False,
                                 "every_steps": every_steps})
    names = [g["name"] for g in optimizer.param_groups]
    assert len(names) > 2 and len(seen) == total
    balanced = set()
    for step, lrs in enumerate(seen):
        # tb.step() calls before this step: one at the start, then one per optimiser step
        # (every_steps) or per epoch; the factors are those of the last recomputation.
        calls = 1 + (step if every_steps else step // steps_per_epoch)
        factors = [r for r in history.tempbalance if r.step <= calls][-1].factors
        eta = LR * _hf_linear_with_warmup(step, warmup, total)
        assert lrs == pytest.approx([eta * factors[n] for n in names], rel=1e-12, abs=1e-15)
        balanced |= {n for n in names if factors[n] != 1.0}
    assert balanced, "TempBalance left every factor at 1"
    recomputed = [r.step for r in history.tempbalance]
    assert recomputed == ([1, 2, 3, 4] if every_steps is None else list(range(1, total + 2, 3)))


class _Interrupt(Exception):
    pass


def _fit(tmp_path, schedule: str, warmup: float, stop_after: int | None = None):
    model = build_model("cnn", seed=0)
    optimizer = _adamw(model)

    def on_epoch(record) -> None:
        if record.epoch == stop_after:
            raise _Interrupt

    checkpoints = Checkpointing(tmp_path, {"schedule": schedule, "warmup": warmup})
    history = fit(model, optimizer, TensorBatches(_data()), None, epochs=4, batch_size=BATCH,
                  seed=1, schedule=schedule, warmup=warmup, checkpoints=checkpoints,
                  tempbalance={"rule": "sigmoid", "by_block": False, "every_steps": 2},
                  on_epoch=on_epoch)
    return history, model


@pytest.mark.parametrize(("schedule", "warmup"), [("linear", 0.06), ("constant", 0.0)])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, schedule, warmup):
    with pytest.raises(_Interrupt):
        _fit(tmp_path / "resumed", schedule, warmup, stop_after=2)
    resumed, resumed_model = _fit(tmp_path / "resumed", schedule, warmup)
    whole, whole_model = _fit(tmp_path / "whole", schedule, warmup)
    assert resumed.resumed_from == 2 and whole.resumed_from == 0
    assert resumed.train_loss == whole.train_loss
    assert [r.lrs for r in resumed.records] == [r.lrs for r in whole.records]
    for a, b in zip(resumed_model.parameters(), whole_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("schedule", "warmup", "message"), [
    ("linear", 1.0, r"warmup must be a fraction .* in \[0, 1\), got 1.0"),
    ("linear", -0.1, r"warmup must be .* got -0.1"),
    ("linear", float("nan"), r"warmup must be .* got nan"),
    ("cosine", 0.06, "warmup .* linear schedule only"),
    ("step", 0.0, "unknown schedule 'step'; choose one of cosine, linear, constant"),
])
def test_bad_schedule_settings(schedule, warmup, message):
    model = build_model("cnn", seed=0)
    with pytest.raises(ScheduleError, match=message):
        train(model, _data(), None, optimizer=_adamw(model), epochs=1, schedule=schedule,
              warmup=warmup)
