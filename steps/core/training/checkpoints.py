"""Checkpoints of the training loop: ``root/epoch-N`` after every epoch, resumed from.

A checkpoint holds the trainable parameters and buffers, the optimiser and RNG tensors
(safetensors) and everything else as JSON (settings, epoch records, optimiser groups,
scheduler, TempBalance state): no pickle. ``state.json`` is written last and the directory
appears under its final name in one rename, so a checkpoint without it is incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steps.core.errors import TailwiseError
from steps.core.pretrained import first_line
from steps.core.training.tempbalance import TempBalance, TempBalanceRecord

__all__ = ["CheckpointError", "Checkpointing", "latest_checkpoint", "restore_checkpoint",
           "save_checkpoint"]

_TENSORS = "tensors.safetensors"
_STATE = "state.json"  # written last: a checkpoint without it is incomplete


class CheckpointError(TailwiseError, ValueError):
    """A checkpoint that cannot be read or does not fit this model or these settings."""


@dataclass(frozen=True)
class Checkpointing:
    """Where the loop checkpoints and what a checkpoint must have been made with.

    directory: ``epoch-N`` checkpoints go here (older ones are removed); the latest complete
        one is resumed from. resume_from: a checkpoint to start from instead.
    settings: JSON-able settings of the run; resuming with other values is refused (keys in
        ``ignored``, e.g. the device, may differ).
    """

    directory: Path | None
    settings: dict[str, Any]
    resume_from: Path | None = None
    ignored: tuple[str, ...] = ("device",)

    def found(self) -> Path | None:
        if self.resume_from is not None:
            return self.resume_from
        return latest_checkpoint(self.directory) if self.directory is not None else None


@dataclass
class TrainingState:
    """The objects a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # None: a constant lr
    tempbalance: TempBalance | None
    generator: torch.Generator


def latest_checkpoint(root: Path) -> Path | None:
    """The complete ``epoch-N`` checkpoint with the largest N under root, if any."""
    if not root.is_dir():
        return None
    done = [p for p in root.glob("epoch-*") if (p / _STATE).is_file()
            and p.name.removeprefix("epoch-").isdigit()]
    return max(done, key=lambda p: int(p.name.removeprefix("epoch-")), default=None)


def save_checkpoint(root: Path, epoch: int, records: list[Any], state: TrainingState,
                    settings: dict[str, Any]) -> Path:
    """Write ``root/epoch-N`` (via a temporary name), then drop older checkpoints."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch}"
    tmp = root / f".epoch-{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"model.{k}": v for k, v in _trained_state(state.model).items()}
    optim_tensors, optim_json = _optimizer_state(state.optimizer)
    tensors |= optim_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = state.generator.get_state()
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
              str(tmp / _TENSORS))
    tb = state.tempbalance
    saved = {
        "epoch": epoch,
        "settings": settings,
        "records": [asdict(r) for r in records],
        "optimizer": optim_json,
        "scheduler": None if state.scheduler is None else {
            k: v for k, v in state.scheduler.state_dict().items() if not callable(v)},
        "tempbalance": None if tb is None else {
            "calls": tb.calls, "factors": tb.factors,
            "history": [asdict(r) for r in tb.history]},
    }
    (tmp / _STATE).write_text(json.dumps(saved))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(path: Path, state: TrainingState,
                       checkpointing: Checkpointing) -> list[dict]:
    """Load a checkpoint into the freshly built objects; returns the epoch records so far."""
    from safetensors.torch import load_file

    try:
        saved = json.loads((path / _STATE).read_text())
        tensors = load_file(str(path / _TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({first_line(exc)})") from exc
    made_with = saved.get("settings", {})
    changed = [k for k, v in checkpointing.settings.items()
               if k not in checkpointing.ignored and made_with.get(k) != v]
    if changed:
        raise CheckpointError(f"checkpoint {path} was made with other settings "
                              f"({', '.join(changed)}); remove it or use the settings it was "
                              "made with")
    trained = _trained_state(state.model)
    model_keys = {k.removeprefix("model.") for k in tensors if k.startswith("model.")}
    if model_keys != set(trained):
        raise CheckpointError(f"checkpoint {path} does not fit this model "
                              f"({len(model_keys)} saved tensors, {len(trained)} expected)")
    with torch.no_grad():
        for name, value in trained.items():
            value.copy_(tensors[f"model.{name}"])
    _restore_optimizer(state.optimizer, tensors, saved["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(saved["scheduler"])
    if state.tempbalance is not None:
        tb = state.tempbalance
        tb.calls = saved["tempbalance"]["calls"]
        tb.factors = saved["tempbalance"]["factors"]
        tb.history = [TempBalanceRecord(**r) for r in saved["tempbalance"]["history"]]
    torch.set_rng_state(tensors["rng.torch"])
    state.generator.set_state(tensors["rng.generator"])
    return saved["records"]


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters (tied ones once) and all buffers."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return state | {n: b for n, b in model.named_buffers() if b is not None}


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state as (tensors, JSON): per-parameter tensors, groups' hyperparameters."""
    tensors, scalars = {}, {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{i}.{key}"] = value
            else:
                scalars[f"{i}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"groups": groups, "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       saved: dict) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(saved["groups"]) != len(optimizer.param_groups):
        raise CheckpointError("checkpoint: optimiser param groups differ from this model's")
    for group, values in zip(optimizer.param_groups, saved["groups"], strict=True):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    optimizer.state.clear()
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            p = params[int(index)]
            optimizer.state[p][name] = value.to(p.device)
    for key, value in saved["scalars"].items():
        index, name = key.split(".", 1)
        optimizer.state[params[int(index)]][name] = value
