"""`tailwise`: the command line. One subcommand per step, plus store, lineage and demo."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from steps.core.errors import TailwiseError
from steps.core.lineage import FORMATS, downstream, render, upstream
from steps.core.store import open_store

app = typer.Typer(
    help="tailwise: measure how well each layer of a model is trained (HT-SR weight spectra), "
    "act on it, and audit every artifact it makes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
store_app = typer.Typer(help="Look into and add to the artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
console = Console()

StoreOption = Annotated[str | None, typer.Option(
    "--store", envvar="TAILWISE_STORE",
    help="Artifact store: a local directory or s3://bucket/prefix [default: .tailwise/store]")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks on errors.")] = False) -> None:
    """Global options (the flag itself is read in main())."""


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="Artifact digest, unique digest prefix or URI.")],
    downstream_: Annotated[bool, typer.Option(
        "--downstream", help="Show what was built from REF instead of what made it.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f",
                                     help=f"One of: {', '.join(FORMATS)}.")] = "text",
    store: StoreOption = None,
) -> None:
    """Show which steps, params and inputs made an artifact (or what was built from it)."""
    if fmt not in FORMATS:
        raise TailwiseError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    the_store = open_store(store)
    graph = (downstream if downstream_ else upstream)(the_store, ref)
    print(render(graph, fmt))


@store_app.command("ls")
def store_ls(
    kind: Annotated[str | None, typer.Option(help="Only artifacts of this kind.")] = None,
    store: StoreOption = None,
) -> None:
    """List the artifacts in the store."""
    manifests = sorted(open_store(store).list(kind), key=lambda m: m.created_at)
    table = Table("digest", "kind", "name", "size", "made by", "created")
    for m in manifests:
        made = m.produced_by.step if m.produced_by else "-"
        table.add_row(m.digest[:12], m.kind, m.name or "", str(m.size), made, m.created_at)
    console.print(table)


@store_app.command("stat")
def store_stat(ref: Annotated[str, typer.Argument(help="Digest, prefix or URI.")],
               store: StoreOption = None) -> None:
    """Print an artifact's manifest (JSON)."""
    print(open_store(store).stat(ref).to_json().decode())


@store_app.command("get")
def store_get(ref: Annotated[str, typer.Argument(help="Digest, prefix or URI.")],
              dest: Annotated[Path, typer.Argument(help="File (or directory) to write.")],
              store: StoreOption = None) -> None:
    """Download an artifact."""
    print(open_store(store).get(ref, dest))


@store_app.command("put")
def store_put(path: Annotated[Path, typer.Argument(help="File or directory to store.")],
              kind: Annotated[str, typer.Option(help="Artifact kind, e.g. model, text.")],
              store: StoreOption = None) -> None:
    """Add a file or directory (e.g. your own HF model dir) as a source artifact."""
    the_store = open_store(store)
    manifest = the_store.put(path, kind)
    print(json.dumps({"digest": manifest.digest, "uri": the_store.uri(manifest.digest)}))


def run_and_report(step_name: str, params: dict, inputs: dict[str, str], store: str | None,
                   use_cache: bool = True):
    """Run one step inline (tracked in MLflow) and print its output digests."""
    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.tracking import open_tracker

    the_store = open_store(store)
    result = run_step(load_step(step_name), params, inputs, store=the_store,
                      tracker=open_tracker(), use_cache=use_cache)
    state = "cached" if result.cached else "computed"
    for name, manifest in result.outputs.items():
        console.print(f"{step_name}.{name}: {manifest.digest}  ({state})")
    return the_store, result


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
    import os

    # Prefect's ephemeral API server can take longer than its 20 s default on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.common import RunSettings
    from flows.demo import DemoParams
    from flows.demo import demo as demo_flow

    results = demo_flow(DemoParams(model=model_name),
                        RunSettings(store=store, use_cache=not no_cache))
    report_demo(results)


def report_demo(results: dict) -> None:
    console.rule("demo finished")
    console.print(f"artifact store : {results['store']}")
    console.print(f"MLflow         : parent run {results['parent_run_id']} "
                  f"in {results['tracking_uri']}")
    if str(results["tracking_uri"]).startswith("sqlite:"):
        console.print(f"                 browse: mlflow ui --backend-store-uri "
                      f"{results['tracking_uri']}")
    last = None
    for step_name in ("build_model", "spectral"):
        result = results[step_name]
        state = "cached" if result.cached else "computed"
        for name, manifest in result.outputs.items():
            console.print(f"{step_name:>11}.{name:<8}: {manifest.digest}  ({state})")
            last = manifest.digest
    for path in results.get("plots", []):
        console.print(f"plot           : {path}")
    console.print(f"audit it       : tailwise lineage {last[:12]}")


def main() -> None:
    """Entry point: user errors print one line and exit 2; `--debug` shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=True)
    except TailwiseError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
