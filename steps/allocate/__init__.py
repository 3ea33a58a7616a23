"""allocate: per-layer decisions (sparsity, lr factor, experts) from a metrics table.

Takes: a spectral metrics table (optionally the model and calibration text, for OWL).
Gives: a decisions table (Parquet, one row per layer or block) and a plot of it.
Start reading: step.py, then the policy modules (alphapruning.py, owl.py, ...).

Every policy module has the same face, `allocate(metrics, options) -> pyarrow.Table`, with a
pydantic options model; `allocate(metrics, policy, **options)` here picks one by name.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from steps.allocate import alphalora, alphapruning, owl, tempbalance, uniform
from steps.allocate.errors import AllocationError
from steps.allocate.io import read_metrics
from steps.allocate.layers import parse_options


@dataclass(frozen=True)
class Policy:
    """A named policy: its options model, its function and the decision column it writes."""

    options: type[BaseModel]
    run: Callable[[pa.Table, Any], pa.Table]
    decision: str


POLICIES: dict[str, Policy] = {
    "uniform": Policy(uniform.UniformOptions, uniform.allocate, "sparsity"),
    "alphapruning": Policy(alphapruning.AlphaPruningOptions, alphapruning.allocate, "sparsity"),
    "owl": Policy(owl.OwlOptions, owl.allocate, "sparsity"),
    "tempbalance": Policy(tempbalance.TempBalanceOptions, tempbalance.allocate, "lr_factor"),
    "alphalora": Policy(alphalora.AlphaLoraOptions, alphalora.allocate, "experts"),
}


def allocate(metrics: pa.Table, policy: str, **options: Any) -> pa.Table:
    """Run the named policy on a metrics table with keyword options (validated)."""
    if policy not in POLICIES:
        raise AllocationError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    chosen = POLICIES[policy]
    return chosen.run(metrics, parse_options(chosen.options, options, policy))


__all__ = ["POLICIES", "AllocationError", "Policy", "allocate", "read_metrics"]
