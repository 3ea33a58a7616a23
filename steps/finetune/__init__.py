"""finetune: training with TempBalance layer-wise learning rates, LoRA and AlphaLoRA experts.

Takes: a model (HF directory, or a plain mlp / cnn) and text-classification data or a dataset.
Gives: the fine-tuned model, adapter, per-epoch history, metrics, subset and alpha plots.
Start reading: step.py, then hf.py (HF models) / plain.py; the loop is steps/core/training.

    from steps.finetune import TempBalance
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tb = TempBalance(model, optimizer)      # regroups the optimiser per layer, in place
"""

from typing import Any

__all__ = ["TempBalance", "TempBalanceError", "layer_param_groups"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the step (e.g. for its params in the CLI) must not import torch.
    if name in __all__:
        from steps.core.training import tempbalance

        return getattr(tempbalance, name)
    raise AttributeError(f"module 'steps.finetune' has no attribute {name!r}")
