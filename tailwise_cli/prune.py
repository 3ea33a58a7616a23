"""`tailwise prune`: prune a causal LM globally or per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steps.core.store import open_store
from tailwise_cli.app import StoreOption, app, input_ref, run_and_report, validate_request


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="HF causal LM directory or artifact digest.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt.")] = "wanda",
    sparsity: Annotated[float | None, typer.Option(
        help="One global sparsity (or give --allocation).")] = None,
    allocation: Annotated[str | None, typer.Option(
        help="Per-layer sparsity: a decisions table from `tailwise allocate` or a digest.")
    ] = None,
    nm: Annotated[str | None, typer.Option(help="N:M structured sparsity, e.g. 2:4.")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="Calibration text (Wanda, SparseGPT): a file, a digest or a built-in corpus: "
        "kjv:train, kjv:validation, kjv:test, fortunes (kjv alone: kjv:train).")] = None,
    nsamples: Annotated[int | None, typer.Option(
        help="Calibration sequences [default: 128; on a CPU try 8].")] = None,
    seqlen: Annotated[int | None, typer.Option(
        help="Tokens per calibration sequence [default: 2048; on a CPU try 512].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_tokens: Annotated[int | None, typer.Option(
        help="Calibration tokens per block call (whole sequences) [default: 512].")] = None,
    compressed: Annotated[bool, typer.Option(
        help="Store the pruned weights as a bitmask and the kept values.")] = False,
    output: Annotated[Path | None, typer.Option(help="Write the pruned model here.")] = None,
    store: StoreOption = None,
) -> None:
    """Prune a causal LM's decoder blocks (magnitude, Wanda, SparseGPT), globally or per layer."""
    params = {"method": method, "sparsity": sparsity, "nm": nm, "device": device,
              "compressed": compressed}
    params |= {k: v for k, v in (("nsamples", nsamples), ("seqlen", seqlen),
                                 ("batch_tokens", batch_tokens)) if v is not None}
    given = {"model": model, "allocation": allocation, "calibration": calibration}
    validate_request("prune", params, [name for name, value in given.items() if value])
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if allocation:
        inputs["allocation"] = input_ref(the_store, allocation, "decisions")
    if calibration:
        inputs["calibration"] = input_ref(the_store, calibration, "text")
    _, result = run_and_report("prune", params, inputs, the_store)
    if output:
        print(the_store.get(result.outputs["model"].digest, output))
