"""The spectral step: a model artifact -> per-matrix metrics, eigenvalues and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from steps.core.farms import DEFAULT_OPS, DEFAULT_Q, DEFAULT_WINDOW, FarmsOptions
from steps.core.step import Output, Step, StepContext
from steps.spectral import analyze, summarize
from steps.spectral.plots import write_plots
from steps.spectral.report import write_report


class SpectralParams(BaseModel):
    estimator: Literal["ks", "alpha_peak", "alpha_peak_corrected", "hill"] = Field(
        "ks",
        description="Power-law fit of the alpha column: ks (WeightWatcher), alpha_peak "
        "(AlphaPruning, reference quirk), alpha_peak_corrected, hill (TempBalance). Every "
        "table also has alpha_peak, alpha_hill and alpha_hill_k1.5.",
    )
    hill_k: float = Field(2.0, gt=1.0, description="hill: xmin at n / k (2: top half).")
    small_n_fit: bool = Field(
        False, description="WeightWatcher 0.7.7's bias-corrected fit for fewer than 20 eigenvalues."
    )
    device: str = Field("auto", description="auto, cpu or cuda.")
    include: list[str] | None = Field(None, description="Regexes: only matching matrices.")
    exclude: list[str] | None = Field(None, description="Regexes: skip matching matrices.")
    # WeightWatcher's skip limits. They apply to every alpha column, while the AlphaPruning
    # and TempBalance references analyse every matrix: matrices whose smaller side is over
    # 15,000 need max_evals raised (or None) for those allocations to see them.
    min_evals: int = Field(10, ge=1, description="Skip matrices with fewer eigenvalues.")
    max_evals: int | None = Field(15_000, ge=1, description="Skip matrices with more "
                                  "eigenvalues (None: no limit).")
    max_n: int | None = Field(50_000, ge=1, description="Skip matrices with a longer side "
                              "(None: no limit).")
    conv_slices: bool = Field(False, description="One row per conv kernel slice.")
    farms: bool = Field(False, description="Also FARMS alpha (alpha_peak_farms) per matrix.")
    farms_window: int = Field(DEFAULT_WINDOW, ge=1, description="FARMS window rows (capped "
                              "at the matrix's smaller side).")
    farms_q: float = Field(DEFAULT_Q, gt=0, description="FARMS window columns / rows.")
    farms_ops: int = Field(DEFAULT_OPS, ge=2, description="FARMS window positions per side.")
    plots: bool = Field(True, description="Draw the alpha-vs-depth and ESD plots.")
    randomize: bool = Field(False, description="Correlation traps: ESD of a shuffled copy "
                            "(lambda_max_rand, num_traps, rand_distance).")
    seed: int = Field(0, ge=0, description="randomize: seed of the shuffles.")


def spectral(ctx: StepContext, params: SpectralParams, inputs: dict[str, Path]) -> dict:
    options = params.model_dump(exclude={"plots", "farms", "farms_window", "farms_q", "farms_ops"})
    farms = params.farms and FarmsOptions(params.farms_window, params.farms_q, params.farms_ops)
    metrics, esd = analyze(inputs["model"], **options, farms=farms, base=inputs.get("base"),
                           progress=ctx.progress, return_esd=True)
    digest = ctx.input_digests.get("model", "")
    metrics = metrics.append_column("model_digest", pa.array([digest] * metrics.num_rows))
    outputs = {
        "metrics": write_table(metrics, ctx.workdir / "metrics.parquet", "spectral-metrics"),
        "esd": write_table(esd, ctx.workdir / "esd.parquet", "esd"),
    }
    ctx.log_metrics({k: v for k, v in summarize(metrics).items() if v == v})  # drop NaN
    if params.plots:
        plot_dir = ctx.workdir / "plots"
        for path in write_plots(metrics, esd, plot_dir):
            ctx.log_file(path, "plots")
        outputs["plots"] = Output(plot_dir, "plots")
    outputs["report"] = html_report(ctx, metrics, esd, digest)
    return outputs


def html_report(ctx: StepContext, metrics: pa.Table, esd: pa.Table, digest: str) -> Output:
    """The HT-SR report page (steps/spectral/report.py), also attached to the MLflow run."""
    path = write_report(metrics, esd, ctx.workdir / "report.html", f"model {digest[:12]}")
    ctx.log_file(path, "report")
    return Output(path, "report", "text/html")


def write_table(table: pa.Table, path: Path, kind: str) -> Output:
    pq.write_table(table, path)
    return Output(path, kind, "application/vnd.apache.parquet")


STEP = Step(name="spectral", version="2", params=SpectralParams, inputs=("model",), fn=spectral,
            optional_inputs=("base",))
