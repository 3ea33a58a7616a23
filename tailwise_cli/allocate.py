"""`tailwise allocate`: per-layer decisions from per-layer metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steps.core.store import open_store
from tailwise_cli.app import (
    StoreOption,
    app,
    console,
    input_ref,
    key_values,
    read_output,
    run_and_report,
)
from tailwise_cli.tables import finite_or_lowest, print_layer_table


@app.command()
def allocate(
    metrics: Annotated[str, typer.Argument(
        help="Per-layer metrics (.parquet or .csv with name + metric columns) or a digest.")],
    policy: Annotated[str, typer.Option(
        help="uniform, alphapruning, owl (sparsity); tempbalance (lr_factor); alphalora "
        "(experts).")] = "alphapruning",
    sparsity: Annotated[float | None, typer.Option(help="Global target sparsity.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="AlphaPruning spread.")] = None,
    metric: Annotated[str | None, typer.Option(
        help="Metric column [default: the paper's: alpha_peak for alphapruning and alphalora, "
        "alpha_hill (alpha_hill_k1.5 for -o variant=sigmoid) for tempbalance, outlier_ratio "
        "for owl]; e.g. alpha_peak_farms after spectral --farms.")] = None,
    mode: Annotated[str | None, typer.Option(
        help="alphapruning, owl, alphalora: reference (the paper's code) or the policy's "
        "improved default.")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Any other policy option as KEY=VALUE (repeatable), e.g. "
        "-o total=160 -o beta=2.5.")] = None,
    model: Annotated[str | None, typer.Option(
        help="owl: the dense model whose outlier ratios are measured.")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="owl: calibration text: a file, a digest or a built-in corpus (kjv:train, "
        "fortunes, ...).")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Also write the decisions table (Parquet) here.")] = None,
    plots: Annotated[Path | None, typer.Option(
        help="Write the decisions plot (decisions.png) into this folder.")] = None,
    top: Annotated[int | None, typer.Option(
        min=1, help="Show only the N layers of largest decision (e.g. sparsity).")] = None,
    store: StoreOption = None,
) -> None:
    """Turn per-layer metrics into per-layer decisions: sparsity, lr factor or LoRA experts."""
    options = {k: v for k, v in (("sparsity", sparsity), ("epsilon", epsilon),
                                 ("metric", metric), ("mode", mode)) if v is not None}
    options |= key_values(option)
    the_store = open_store(store)
    params = {"policy": policy, "options": options}
    inputs = {"metrics": input_ref(the_store, metrics, "metrics")}
    if model:
        inputs["model"] = input_ref(the_store, model, "model")
    if calibration:
        inputs["calibration"] = input_ref(the_store, calibration, "text")
    _, result = run_and_report("allocate", params, inputs, store)
    print_decisions(read_output(the_store, result.outputs["decisions"].digest, output), top)
    report_plot(the_store, result.outputs.get("plot"), plots)


def print_decisions(decisions, top: int | None = None) -> None:
    column = next(c for c in ("sparsity", "lr_factor", "experts") if c in decisions.column_names)
    rows = decisions.to_pylist()
    values = [row[column] for row in rows]
    cells = [(row["name"], str(row.get("block")),
              f"{value:.4f}" if isinstance(value, float) else str(value))
             for row, value in zip(rows, values, strict=True)]
    known = [v for v in values if v is not None]
    summary = f"{len(rows)} layers; {column} min {min(known):.4g}, mean " \
        f"{sum(known) / len(known):.4g}, max {max(known):.4g}" if known else f"{len(rows)} layers"
    print_layer_table("per-layer decisions", ("name", "block", column), cells, top=top,
                      rank=lambda i: finite_or_lowest(values[i]), ranked_by=column,
                      summary=summary)


def report_plot(the_store, plot, folder: Path | None) -> None:
    """Say where the decisions plot is: written into `folder`, or its artifact digest."""
    if plot is None:
        return
    if folder is None:
        console.print(f"plot: {plot.digest[:12]} in the store (decisions.png; --plots DIR "
                      f"writes it, or tailwise store get {plot.digest[:12]} decisions.png)",
                      soft_wrap=True)
        return
    console.print(f"plot: {the_store.get(plot.digest, folder / 'decisions.png')}", soft_wrap=True)
