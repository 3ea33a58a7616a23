"""`tailwise evaluate`: perplexity or accuracy, sparsity and size of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steps.cli.app import StoreOption, app, console, input_ref, read_output, run_and_report
from steps.core.store import open_store


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model directory or artifact digest.")],
    perplexity: Annotated[str | None, typer.Option(
        help="Text: perplexity over non-overlapping windows. A file, a digest or a built-in "
        "corpus: kjv:test, kjv:validation, kjv:train, fortunes (kjv alone: kjv:test).")] = None,
    data: Annotated[str | None, typer.Option(
        help="Labelled JSONL (or digest): accuracy of a fine-tuned classifier on its test "
        "split.")] = None,
    seqlen: Annotated[int | None, typer.Option(
        help="Window length [default: the model's context, at most 2048; on a CPU try 512 "
        "with --max-windows 16].")] = None,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first windows.")
                           ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    store: StoreOption = None,
) -> None:
    """Perplexity (or a classifier's accuracy), sparsity, parameter count and size on disk."""
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if perplexity:
        inputs["text"] = input_ref(the_store, perplexity, "text", corpus_split="test")
    if data:
        inputs["data"] = input_ref(the_store, data, "text-classification")
    params = {"seqlen": seqlen, "max_windows": max_windows, "device": device,
              "name": Path(model).name}
    _, result = run_and_report("evaluate", params, inputs, store)
    evaluation = read_output(the_store, result.outputs["evaluation"].digest)
    for key, value in evaluation.to_pylist()[0].items():
        console.print(f"{key:>16}: {value}")
