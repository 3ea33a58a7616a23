"""`tailwise spectral`: per-matrix ESD metrics of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steps.core.registry import load_step
from steps.core.store import open_store
from tailwise_cli.app import StoreOption, app, console, input_ref, read_output, run_and_report
from tailwise_cli.tables import finite_or_lowest, print_layer_table


@app.command()
def spectral(
    model: Annotated[str, typer.Argument(
        help="HF model directory, .safetensors file, sharded index .json, or artifact digest.")],
    estimator: Annotated[str, typer.Option(
        help="ks (WeightWatcher), alpha_peak (AlphaPruning), alpha_peak_corrected, hill "
        "(TempBalance).")] = "ks",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    output: Annotated[Path | None, typer.Option(
        help="Also write the metrics table (Parquet) here.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Also write the plots here.")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Regex: analyse only matching matrices (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Regex: skip matching matrices (repeatable).")] = None,
    conv_slices: Annotated[bool, typer.Option(
        help="One row per conv kernel slice instead of the pooled ESD.")] = False,
    farms: Annotated[bool, typer.Option(
        help="Also measure FARMS alpha (column alpha_peak_farms) on fixed-aspect-ratio "
        "windows.")] = False,
    farms_window: Annotated[int, typer.Option(
        help="FARMS window rows (capped at the matrix's smaller side).")] = 2000,
    farms_q: Annotated[float, typer.Option(help="FARMS window columns / rows.")] = 1.0,
    farms_ops: Annotated[int, typer.Option(
        help="FARMS window positions per side (at most ops x ops windows).")] = 10,
    randomize: Annotated[bool, typer.Option(
        help="Correlation traps (WeightWatcher's randomize): ESD of a shuffled copy of each "
        "matrix: lambda_max_rand, num_traps, rand_distance.")] = False,
    base: Annotated[str | None, typer.Option(
        help="Base model (dir, file or digest): analyse the fine-tune's delta W - W_base per "
        "matrix. A PEFT LoRA adapter dir as MODEL analyses B A per adapted matrix.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute.")] = False,
    top: Annotated[int | None, typer.Option(
        min=1, help="Show only the N matrices of largest alpha (least trained).")] = None,
    store: StoreOption = None,
) -> None:
    """Measure every weight matrix's eigenvalue spectrum: alpha, norms, rank, warnings."""
    from steps.spectral.delta import check_base, is_adapter_dir

    if base is not None:
        check_base(model, base)  # another architecture: refused before anything is stored
    params = {"estimator": estimator, "device": device, "include": include,
              "exclude": exclude, "conv_slices": conv_slices, "randomize": randomize,
              "farms": farms, "farms_window": farms_window, "farms_q": farms_q,
              "farms_ops": farms_ops}
    load_step("spectral").validate(params)  # bad options fail before the model is stored
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model,
                                 "lora-adapter" if is_adapter_dir(model) else "model")}
    if base is not None:
        inputs["base"] = input_ref(the_store, base, "model")
    _, result = run_and_report("spectral", params, inputs, store, use_cache=not no_cache,
                               progress=True)
    metrics = read_output(the_store, result.outputs["metrics"].digest, output)
    print_spectral_summary(metrics, top)
    if randomize:
        print_traps(metrics)
    if output:
        console.print(f"metrics: {output}")
    if plots and "plots" in result.outputs:
        the_store.get(result.outputs["plots"].digest, plots)
        for png in sorted(plots.glob("*.png")):
            console.print(f"plot: {png}")


def print_spectral_summary(metrics, top: int | None = None) -> None:
    from steps.spectral import summarize

    rows = metrics.to_pylist()
    cells = [(row["name"], str(row["layer_id"]), f"{row['N']} x {row['M']}",
              f"{row['alpha']:.3f}", f"{row['D']:.3f}", f"{row['lambda_max']:.4g}",
              f"{row['log_norm']:.3f}", row["warning"] or row["status"]) for row in rows]
    summary = summarize(metrics)
    print_layer_table(
        "per-matrix spectral metrics",
        ("name", "layer", "N x M", "alpha", "D", "lambda_max", "log_norm", "warning"), cells,
        optional=("layer", "lambda_max", "D", "log_norm"), top=top,
        rank=lambda i: finite_or_lowest(rows[i]["alpha"]), ranked_by="alpha",
        summary=f"{summary['num_fitted']}/{summary['num_matrices']} matrices fitted; mean "
                f"alpha {summary['mean_alpha']:.3f}, mean alpha_weighted "
                f"{summary['mean_alpha_weighted']:.3f}; {summary['num_over_trained']} "
                f"over-trained (alpha < 2), {summary['num_under_trained']} under-trained "
                f"(alpha > 6)")


def print_traps(metrics) -> None:
    """The matrices whose shuffled copy has eigenvalues beyond the MP bulk."""
    trapped = [(row["name"], row["num_traps"]) for row in metrics.to_pylist()
               if row["num_traps"]]
    console.print(f"correlation traps: {len(trapped)}/{metrics.num_rows} matrices"
                  + "".join(f"\n  {name}: {count}" for name, count in trapped))
