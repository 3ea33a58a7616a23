"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2024, luuyin/OWL).

Given each block's outlier ratio D_l (the share of Wanda scores |W_ij| * ||X_j|| above
M times the block's mean score; the prune step computes it from calibration data),
the OWL code sets
  density_l = (D_l - D_min) / (D_max - D_min) * 2 lambda,  shifted so mean(density) = 1 - S
  sparsity_l = 1 - density_l
so blocks with more outliers keep more weights. The code replaces sparsity <= 0 by 0.01.

The reference measures the outlier ratios on 128 calibration sequences of 2048 tokens
(luuyin/OWL main.py: ``--nsamples 128``, ``model.seqlen = 2048``, C4). The budget the ratios
came from travels in the ratio table's metadata (``with_calibration``) into the decisions'
metadata (``calibration``), so a quick run is never mistaken for the reference setting.
"""

import json
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from steps.allocate.budget import fit_budget
from steps.allocate.layers import (
    block_column,
    block_ids,
    decisions_table,
    fail,
    layer_names,
    metric_values,
    param_counts,
)
from steps.core.balance import block_means, min_max_unit

REFERENCE_SAMPLES = 128
REFERENCE_SEQLEN = 2048
_CALIBRATION_KEY = b"tailwise.owl_calibration"


def with_calibration(ratios: pa.Table, samples: int, seqlen: int) -> pa.Table:
    """The outlier-ratio table with the calibration budget it was measured on recorded."""
    metadata = dict(ratios.schema.metadata or {})
    metadata[_CALIBRATION_KEY] = json.dumps({"samples": samples, "seqlen": seqlen}).encode()
    return ratios.replace_schema_metadata(metadata)


def calibration_budget(ratios: pa.Table) -> dict:
    """{"samples", "seqlen", "reference"} of the calibration the ratios came from; all None
    when the table does not say (ratios given by hand)."""
    raw = (ratios.schema.metadata or {}).get(_CALIBRATION_KEY)
    if raw is None:
        return {"samples": None, "seqlen": None, "reference": None}
    budget = json.loads(raw)
    reference = (budget["samples"] >= REFERENCE_SAMPLES and budget["seqlen"] >= REFERENCE_SEQLEN)
    return {**budget, "reference": reference}


def calibration_note(budget: dict) -> str | None:
    """One line to print beside OWL results that do not come from the reference budget."""
    reference = f"the reference calibration is {REFERENCE_SAMPLES} x {REFERENCE_SEQLEN} tokens"
    if budget["reference"] is None:
        return f"OWL outlier ratios of unknown calibration ({reference})"
    if not budget["reference"]:
        return (f"OWL outlier ratios from {budget['samples']} x {budget['seqlen']} calibration "
                f"tokens, not the reference setting ({reference})")
    return None


class OwlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(0.7, ge=0, lt=1, description="global target sparsity S in [0, 1)")
    lam: float = Field(0.08, ge=0, lt=1, description="OWL lambda: sparsities span 2 * lambda")
    metric: str = Field("outlier_ratio", description="column with the per-block outlier ratio")
    by_block: bool = Field(True, description="one sparsity per block, as OWL")
    mode: Literal["clipped", "reference"] = Field(
        "clipped",
        description="reference: the OWL code (plain mean over blocks, sparsity <= 0 -> 0.01); "
        "clipped: parameter-weighted budget, clipped to [0, max_sparsity] and redistributed",
    )
    max_sparsity: float = Field(0.99, gt=0, lt=1, description="upper clip in clipped mode")


def allocate(metrics: pa.Table, options: OwlOptions) -> pa.Table:
    """Per-layer sparsity from outlier ratios; more outliers, less pruning."""
    names = layer_names(metrics)
    ratio = metric_values(metrics, options.metric)
    if (ratio < 0).any():
        raise fail(metrics, f"column {options.metric} must be >= 0")
    blocks = block_ids(metrics, required=options.by_block)
    params = param_counts(metrics)
    groups = blocks if options.by_block else np.arange(len(names))
    # A block's ratio over all its scores is the parameter-weighted mean of its layers' ratios
    # when each layer's ratio was counted against the block's threshold.
    score = block_means(ratio, groups, params)
    spread = min_max_unit(score) * 2 * options.lam  # density before the shift

    if options.mode == "reference":
        _, first = np.unique(groups, return_index=True)  # OWL averages over blocks, unweighted
        sparsity = options.sparsity + spread[first].mean() - spread
        clipped = sparsity <= 0
        sparsity = np.where(clipped, 0.01, sparsity)
    else:
        if options.sparsity > options.max_sparsity:
            raise fail(
                metrics,
                f"target sparsity {options.sparsity} exceeds max_sparsity {options.max_sparsity}",
            )
        sparsity, clipped = fit_budget(
            -spread, params, options.sparsity, low=0.0, high=options.max_sparsity, how="shift"
        )

    columns = {
        "name": names,
        "block": block_column(blocks, len(names)),
        "params": params,
        options.metric: ratio,
        "score": score,
        "sparsity": sparsity,
        "clipped": clipped,
    }
    return decisions_table(
        columns, policy="owl", options=options, source=metrics, clipped=bool(clipped.any()),
        calibration=calibration_budget(metrics),
    )
