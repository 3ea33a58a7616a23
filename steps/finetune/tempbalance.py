"""TempBalance, kept at its old import path: it lives in ``steps.core.training.tempbalance``."""

from steps.core.training.tempbalance import (
    TempBalance,
    TempBalanceError,
    TempBalanceRecord,
    layer_param_groups,
    sigmoid_interval,
)

__all__ = ["TempBalance", "TempBalanceError", "TempBalanceRecord", "layer_param_groups",
           "sigmoid_interval"]
