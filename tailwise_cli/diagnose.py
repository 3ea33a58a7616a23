"""`tailwise diagnose`: loss-landscape features and the MD tree verdict."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from steps.core.store import open_store
from tailwise_cli.app import StoreOption, app, console, input_ref, read_output, run_and_report


@app.command()
def diagnose(
    model: Annotated[str, typer.Argument(
        help="Trained plain model (mlp / cnn) directory or artifact digest.")],
    data: Annotated[str, typer.Option(
        help="The scikit-learn set it was trained on: digits, iris, wine, breast_cancer.")
    ] = "digits",
    model_b: Annotated[str | None, typer.Option(
        help="The same configuration trained from another seed: connectivity and CKA.")
    ] = None,
    tree: Annotated[str | None, typer.Option(
        help="A fitted MD tree (JSON file or digest, e.g. from the model_zoo flow).")] = None,
    question: Annotated[str | None, typer.Option(
        help="bs_failure, width_vs_batch or data_vs_batch (checked against the tree).")
    ] = None,
    fraction: Annotated[float, typer.Option(
        help="Share of the training split the model was trained on.")] = 1.0,
    data_seed: Annotated[int, typer.Option(help="Seed of that training subset.")] = 0,
    trace_probes: Annotated[int, typer.Option(help="Hutchinson probes.")] = 32,
    curve_epochs: Annotated[int | None, typer.Option(
        help="Epochs training the Bezier bend (default: the released data's 50 / fraction).")
    ] = None,
    store: StoreOption = None,
) -> None:
    """Loss-landscape features of a trained classifier and, with a tree, its diagnosis."""
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if model_b:
        inputs["model_b"] = input_ref(the_store, model_b, "model")
    if tree:
        inputs["tree"] = input_ref(the_store, tree, "md-tree")
    params = {"dataset": data, "question": question, "fraction": fraction,
              "data_seed": data_seed, "trace_probes": trace_probes,
              "curve_epochs": curve_epochs}
    _, result = run_and_report("diagnose", params, inputs, store)
    if "diagnosis" not in result.outputs:
        features = read_output(the_store, result.outputs["features"].digest)
        for key, value in features.to_pylist()[0].items():
            console.print(f"{key:>24}: {value}")
        return
    with tempfile.TemporaryDirectory() as scratch:
        found = json.loads(the_store.get(result.outputs["diagnosis"].digest,
                                         Path(scratch) / "diagnosis.json").read_text())
    console.print(f"{found['question']}: [bold]{found['answer']}[/bold]")
    for step in found["path"]:
        console.print(f"  {step['text']}")
    for key, value in found["features"].items():
        console.print(f"{key:>24}: {value}")
