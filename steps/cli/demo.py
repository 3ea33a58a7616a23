"""`tailwise model` and `tailwise demo`: build a model; run the demo flow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from steps.cli.app import StoreOption, app, console, run_and_report
from steps.core.store import open_store


@app.command()
def model(
    name: Annotated[str, typer.Argument(
        help="tiny-gpt2, tiny-llama, cnn, mlp (seeded random) or minilm, smollm2 (pretrained, "
        "shipped by PyPI packages).")],
    seed: Annotated[int, typer.Option(help="Seed of the tiny random models.")] = 0,
    output: Annotated[Path | None, typer.Option(
        help="Also write the model directory here.")] = None,
    store: StoreOption = None,
) -> None:
    """Build a model and store it as an artifact (an HF directory with safetensors)."""
    the_store, result = run_and_report("build_model", {"name": name, "seed": seed}, {}, store)
    if output is not None:
        print(the_store.get(result.outputs["model"].digest, output))


@app.command()
def demo(
    model_name: Annotated[str, typer.Option("--model", help="Model to build.")] = "tiny-gpt2",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute every step.")] = False,
    store: StoreOption = None,
) -> None:
    """Run the demo flow on the embedded default (no servers) and say where to look."""
    # Prefect's ephemeral API server can take longer than its 20 s default on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.common import RunSettings
    from flows.demo import DemoParams
    from flows.demo import demo as demo_flow

    results = demo_flow(DemoParams(model=model_name),
                        RunSettings(store=store, use_cache=not no_cache))
    report_demo(results, open_store(store))


def report_demo(results: dict, the_store) -> None:
    console.rule("demo finished")
    console.print(f"artifact store : {results['store']}")
    console.print(f"MLflow         : parent run {results['parent_run_id']} "
                  f"in {results['tracking_uri']}")
    if str(results["tracking_uri"]).startswith("sqlite:"):
        console.print(f"                 browse: mlflow ui --backend-store-uri "
                      f"{results['tracking_uri']}")
    for step_name in ("build_model", "spectral"):
        result = results[step_name]
        state = "cached" if result.cached else "computed"
        for name, manifest in result.outputs.items():
            console.print(f"{step_name:>11}.{name:<3}: {manifest.digest}  ({state})",
                          soft_wrap=True)
    plots = results["spectral"].outputs.get("plots")
    if plots is not None:
        folder = Path(".tailwise") / "demo" / f"plots-{plots.digest[:12]}"
        the_store.get(plots.digest, folder)
        for png in sorted(folder.glob("*.png")):
            console.print(f"plot           : {png}")
    metrics = results["spectral"].outputs["metrics"].digest
    console.print(f"audit it       : tailwise lineage {metrics[:12]}", soft_wrap=True)
