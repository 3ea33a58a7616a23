"""`tailwise allocate`: per-layer decisions from per-layer metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steps.cli.app import (
    StoreOption,
    app,
    console,
    input_ref,
    key_values,
    read_output,
    run_and_report,
)
from steps.core.store import open_store


@app.command()
def allocate(
    metrics: Annotated[str, typer.Argument(
        help="Per-layer metrics (.parquet or .csv with name + metric columns) or a digest.")],
    policy: Annotated[str, typer.Option(
        help="uniform, alphapruning, owl (sparsity); tempbalance (lr_factor); alphalora "
        "(experts).")] = "alphapruning",
    sparsity: Annotated[float | None, typer.Option(help="Global target sparsity.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="AlphaPruning spread.")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric column [default: alpha].")] = None,
    mode: Annotated[str | None, typer.Option(
        help="reference (the paper's code) or the policy's improved default.")] = None,
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
    print_decisions(read_output(the_store, result.outputs["decisions"].digest, output))


def print_decisions(decisions) -> None:
    column = next(c for c in ("sparsity", "lr_factor", "experts") if c in decisions.column_names)
    table = Table("name", "block", column, title="per-layer decisions")
    for row in decisions.to_pylist():
        value = row[column]
        table.add_row(row["name"], str(row.get("block")),
                      f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
