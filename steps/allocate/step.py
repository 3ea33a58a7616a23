"""The allocate step: a per-layer metrics table -> per-layer decisions by a named policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from steps.allocate import POLICIES, allocate, read_metrics
from steps.allocate.plots import plot_decisions
from steps.core.step import Output, Step, StepContext


class AllocateParams(BaseModel):
    policy: Literal["uniform", "alphapruning", "owl", "tempbalance", "alphalora"] = Field(
        "alphapruning", description="Which decision to make, and how.")
    options: dict[str, Any] = Field(default_factory=dict, description="The policy's options, "
                                    "e.g. {'sparsity': 0.7, 'epsilon': 0.2}.")
    blocks_only: bool = Field(True, description="Drop rows outside the repeated blocks "
                              "(embeddings, lm_head): the policies decide per block.")


def allocate_step(ctx: StepContext, params: AllocateParams, inputs: dict[str, Path]) -> dict:
    metrics = read_metrics(inputs["metrics"])
    if params.blocks_only and "block" in metrics.column_names:
        metrics = metrics.filter(pc.is_valid(metrics["block"]))
    decisions = allocate(metrics, params.policy, **params.options)
    table_path = ctx.workdir / "decisions.parquet"
    pq.write_table(decisions, table_path)
    plot = plot_decisions(decisions, ctx.workdir / "decisions.png",
                          title=f"{params.policy} {params.options or ''}".strip())
    ctx.log_file(plot, "plots")
    ctx.log_metrics(decision_summary(decisions, POLICIES[params.policy].decision))
    return {"decisions": Output(table_path, "decisions", "application/vnd.apache.parquet"),
            "plot": Output(plot, "plot", "image/png")}


def decision_summary(decisions: pa.Table, column: str) -> dict[str, float]:
    values = decisions[column]
    return {f"{column}_min": pc.min(values).as_py(), f"{column}_max": pc.max(values).as_py(),
            f"{column}_mean": pc.mean(values).as_py(), "layers": decisions.num_rows}


STEP = Step(name="allocate", version="1", params=AllocateParams, inputs=("metrics",),
            fn=allocate_step)
