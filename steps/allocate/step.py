"""The allocate step: a per-layer metrics table -> per-layer decisions by a named policy."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from steps.allocate import POLICIES, AllocationError, allocate, owl, read_metrics
from steps.allocate.io import with_source
from steps.allocate.layers import read_metadata
from steps.allocate.plots import plot_decisions
from steps.core.step import Output, Step, StepContext


class AllocateParams(BaseModel):
    policy: Literal["uniform", "alphapruning", "owl", "tempbalance", "alphalora"] = Field(
        "alphapruning", description="Which decision to make, and how.")
    options: dict[str, Any] = Field(default_factory=dict, description="The policy's options, "
                                    "e.g. {'sparsity': 0.7, 'epsilon': 0.2}.")
    blocks_only: bool = Field(True, description="Drop rows outside the repeated blocks "
                              "(embeddings, lm_head): the policies decide per block.")
    calibration_samples: int = Field(owl.REFERENCE_SAMPLES, ge=1, description="owl: "
                                     "calibration sequences used to measure the outlier ratios "
                                     "(model + calibration inputs); the reference uses 128.")
    calibration_seqlen: int = Field(owl.REFERENCE_SEQLEN, ge=8, description="owl: tokens per "
                                    "sequence; the reference uses 2048.")
    device: str = Field("auto", description="owl: where the calibration forward runs.")


def allocate_step(ctx: StepContext, params: AllocateParams, inputs: dict[str, Path]) -> dict:
    # Name the input by digest, not by its scratch path: errors stay meaningful and the
    # decisions table (which records its source) is the same wherever the step runs.
    metrics = with_source(read_metrics(inputs["metrics"]),
                          f"metrics {ctx.input_digests.get('metrics', '')[:12]}".strip())
    if params.policy == "owl" and "outlier_ratio" not in metrics.column_names:
        metrics = measured_outlier_ratios(params, inputs)
    options = dict(params.options)
    if params.blocks_only and "block" in metrics.column_names:
        in_blocks = pc.is_valid(metrics["block"])
        if params.policy == "tempbalance" and model_ends_dropped(in_blocks):
            # TempBalance leaves the model's first and last layers out; dropping the rows
            # outside the blocks (embeddings, lm_head) has done that already, so the block
            # layers now at the ends of the table take part.
            options["exclude_first_last"] = False
        metrics = metrics.filter(in_blocks)
    decisions = allocate(metrics, params.policy, **options)
    if params.policy == "owl":
        report_owl_calibration(ctx, decisions)
    table_path = ctx.workdir / "decisions.parquet"
    pq.write_table(decisions, table_path)
    plot = plot_decisions(decisions, ctx.workdir / "decisions.png",
                          title=f"{params.policy} {params.options or ''}".strip())
    ctx.log_file(plot, "plots")
    ctx.log_metrics(decision_summary(decisions, POLICIES[params.policy].decision))
    return {"decisions": Output(table_path, "decisions", "application/vnd.apache.parquet"),
            "plot": Output(plot, "plot", "image/png")}


def model_ends_dropped(in_blocks: pa.ChunkedArray) -> bool:
    """Whether the first and the last rows (the model's first and last layers) lie outside
    the blocks."""
    return len(in_blocks) > 0 and not in_blocks[0].as_py() and not in_blocks[-1].as_py()


def measured_outlier_ratios(params: AllocateParams, inputs: dict[str, Path]) -> pa.Table:
    """OWL's per-layer outlier ratios of the dense model on its calibration text."""
    if "model" not in inputs or "calibration" not in inputs:
        raise AllocationError("owl: the metrics table has no outlier_ratio column; give the "
                              "model and calibration inputs to measure it")
    from transformers import AutoTokenizer

    from steps.core.blocks import fit_seqlen, outlier_ratios
    from steps.core.calibration import calibration_input_ids
    from steps.core.devices import resolve_device
    from steps.core.factory import load_model

    model = load_model(inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"], local_files_only=True)
    ids = calibration_input_ids(tokenizer, inputs["calibration"],
                                nsamples=params.calibration_samples,
                                seqlen=fit_seqlen(model, params.calibration_seqlen), seed=0)
    ratios = outlier_ratios(model, ids, device=resolve_device(params.device))
    return owl.with_calibration(ratios, samples=ids.shape[0], seqlen=ids.shape[1])


def report_owl_calibration(ctx: StepContext, decisions: pa.Table) -> None:
    """Log the calibration budget behind OWL decisions; warn when it is not the reference's."""
    budget = read_metadata(decisions, "calibration")
    if budget["samples"] is not None:
        ctx.log_metrics({"owl_calibration_samples": budget["samples"],
                         "owl_calibration_seqlen": budget["seqlen"]})
    if note := owl.calibration_note(budget):
        warnings.warn(note, stacklevel=2)


def decision_summary(decisions: pa.Table, column: str) -> dict[str, float]:
    values = decisions[column]
    return {f"{column}_min": pc.min(values).as_py(), f"{column}_max": pc.max(values).as_py(),
            f"{column}_mean": pc.mean(values).as_py(), "layers": decisions.num_rows}


STEP = Step(name="allocate", version="1", params=AllocateParams, inputs=("metrics",),
            fn=allocate_step, optional_inputs=("model", "calibration"))
