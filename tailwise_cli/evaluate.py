"""`tailwise evaluate`: perplexity or accuracy, zero-shot accuracy (lm-eval), sparsity and size
of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steps.core.store import open_store
from tailwise_cli.app import StoreOption, app, console, input_ref, read_output, run_and_report


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
    tasks: Annotated[str | None, typer.Option(
        help="Zero-shot tasks through lm-evaluation-harness, comma-separated: kjv_next_verse "
        "(shipped, offline), boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, "
        "openbookqa (datasets from the machine's Hugging Face cache), or tasks of --task-dir."
    )] = None,
    task_dir: Annotated[Path | None, typer.Option(
        help="Directory of lm-eval task YAML files and their local data (JSONL).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Zero-shot: only the first examples of each task.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    store: StoreOption = None,
) -> None:
    """Perplexity (or a classifier's accuracy), zero-shot accuracy per task, sparsity,
    parameter count and size on disk."""
    task_names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if task_names or task_dir is not None:
        from steps.evaluate.zeroshot import load_tasks

        load_tasks(task_names, task_dir)  # a missing task or dataset: before anything is stored
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if task_dir is not None:
        inputs["tasks"] = the_store.put(task_dir, "zeroshot-tasks").digest
    if perplexity:
        inputs["text"] = input_ref(the_store, perplexity, "text", corpus_split="test")
    if data:
        inputs["data"] = input_ref(the_store, data, "text-classification")
    params = {"seqlen": seqlen, "max_windows": max_windows, "device": device,
              "name": Path(model).name, "tasks": task_names, "limit": limit}
    _, result = run_and_report("evaluate", params, inputs, store)
    evaluation = read_output(the_store, result.outputs["evaluation"].digest)
    for key, value in evaluation.to_pylist()[0].items():
        console.print(f"{key:>16}: {value}")
    if "zeroshot" in result.outputs:
        print_zero_shot(read_output(the_store, result.outputs["zeroshot"].digest))


def print_zero_shot(rows) -> None:
    table = Table("task", "acc", "acc_norm", "examples", title="zero-shot (lm-eval)")
    for row in rows.to_pylist():
        table.add_row(row["task"], _plus_minus(row["acc"], row["acc_stderr"]),
                      _plus_minus(row["acc_norm"], row["acc_norm_stderr"]),
                      str(row["examples"]))
    console.print(table)


def _plus_minus(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" +- {stderr:.4f}" if stderr is not None else "")
