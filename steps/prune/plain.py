"""Magnitude pruning of a plain factory classifier (MLP / CNN): the prunability experiments.

    report = prune_plain(model, sparsity=0.9)                  # global: one |W| threshold
    report = prune_plain(model, allocation={"layers.0": 0.5})  # per layer, others dense

The weights pruned are those of every Linear and Conv layer (``steps.core.sparsity``), the
classifier included; biases and BatchNorm stay. With ``sparsity`` alone the smallest |W| of
all those weights together are zeroed (global magnitude pruning, as iterative magnitude
pruning does): exactly round(total * sparsity) weights, ties broken by position (module
order, then row-major), so the same model and ratio give the same mask. With an
``allocation`` every named layer is pruned to its own ratio by its own threshold, and the
layers it does not name get ``sparsity`` (or stay dense). The report has the LM pruner's
schema (name, target, achieved, params), one row per layer, named by module.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from steps.core.factory import plain_kind
from steps.core.sparsity import prunable_weights
from steps.prune.api import REPORT_SCHEMA, Allocation, PruneError, check_sparsity, read_allocation
from steps.prune.masks import lowest_k, lowest_overall, pruned_count

__all__ = ["prune_plain"]


def _layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> weight data of the prunable layers."""
    return {name.removesuffix(".weight"): weight.data
            for name, weight in prunable_weights(model).items()}


def _check_request(model: nn.Module, method: str, sparsity: float | None,
                   allocation: Allocation | None, nm) -> None:
    if plain_kind(model) is None:
        raise PruneError(f"model: a {type(model).__name__} is not a plain factory model "
                         f"(mlp or cnn)")
    if method != "magnitude":
        raise PruneError(f"method {method!r}: plain models (mlp, cnn) are pruned by magnitude "
                         f"only (wanda and sparsegpt need a language model's calibration text)")
    if nm is not None:
        raise PruneError(f"nm {nm!r}: N:M patterns are for language models; give plain models "
                         f"a sparsity or an allocation")
    if sparsity is None and allocation is None:
        raise PruneError("give a sparsity or an allocation")


@torch.no_grad()
def _prune_globally(weights: dict[str, torch.Tensor], sparsity: float) -> None:
    flat = torch.cat([w.abs().flatten() for w in weights.values()]).unsqueeze(0)
    mask = lowest_k(flat, pruned_count(flat.shape[1], sparsity)).squeeze(0)
    for weight, pruned in zip(weights.values(), mask.split([w.numel() for w in weights.values()]),
                              strict=True):
        weight[pruned.view_as(weight)] = 0


def prune_plain(model: nn.Module, *, method: str = "magnitude", sparsity: float | None = None,
                allocation: Allocation | None = None, nm=None) -> pa.Table:
    """Prune the model's Linear / Conv weights in place by magnitude; returns the report.

    Every input is checked before a weight changes (see the module doc for the rules).
    """
    _check_request(model, method, sparsity, allocation, nm)
    weights = _layer_weights(model)
    default = check_sparsity(sparsity, "target") if sparsity is not None else 0.0
    ratios = read_allocation(allocation) if allocation is not None else {}
    unknown = sorted(set(ratios) - set(weights))
    if unknown:
        raise PruneError(f"allocation names {unknown[:3]}, not prunable layers of the model "
                         f"(it has {', '.join(weights)})")
    for name, ratio in ratios.items():
        check_sparsity(ratio, f"layer {name}:")
    targets = {name: ratios.get(name, default) for name in weights}
    if allocation is None:
        _prune_globally(weights, default)
    else:
        for name, weight in weights.items():
            if targets[name] > 0:
                weight[lowest_overall(weight.abs(), targets[name])] = 0
    rows = [(name, targets[name], int((w == 0).sum()) / w.numel(), w.numel())
            for name, w in weights.items()]
    return pa.table([list(column) for column in zip(*rows, strict=True)], schema=REPORT_SCHEMA)
