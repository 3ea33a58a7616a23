"""Which weights of a plain factory model are prunable, and keeping pruned ones at zero.

    weights = prunable_weights(model)            # name -> weight of every Linear / Conv
    masks = zero_masks(model)                    # name -> True where the weight is kept
    hold = keep_zeros(optimizer, model, masks)   # re-zero after every optimiser step
    density(model)                               # share of non-zero prunable weights

The prune step (which weights to zero) and the finetune step (which to keep at zero while
retraining) both need this, so it lives here. Biases and normalisation parameters are never
pruned: they are few and pruning them breaks a layer rather than thinning it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_masks", "density", "keep_zeros", "prunable_weights", "zero_masks"]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every Linear / Conv module, keyed by its state-dict name, in module order."""
    return {f"{name}.weight" if name else "weight": module.weight
            for name, module in model.named_modules() if isinstance(module, PRUNABLE)}


@torch.no_grad()
def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """True where a prunable weight is non-zero (kept), False where it is exactly zero."""
    return {name: weight != 0 for name, weight in prunable_weights(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set every weight that its mask marks as pruned to exactly zero, in place."""
    weights = prunable_weights(model)
    for name, keep in masks.items():
        # masked_fill, not a product: 0 * inf would be NaN, the fill is always 0.
        weights[name].masked_fill_(~keep, 0.0)


def keep_zeros(optimizer: torch.optim.Optimizer, model: nn.Module,
               masks: dict[str, torch.Tensor]):
    """Re-apply ``masks`` after every ``optimizer.step()``; returns the hook's handle.

    Re-zeroing after the step (rather than masking gradients) keeps the zeros exact whatever
    the optimiser does with momentum, weight decay or adaptive scaling.
    """
    return optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))


@torch.no_grad()
def density(model: nn.Module) -> float:
    """Share of the prunable weights that are non-zero (1.0 for a dense model)."""
    weights = list(prunable_weights(model).values())
    total = sum(w.numel() for w in weights)
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weights")
    return sum(int(w.count_nonzero()) for w in weights) / total
