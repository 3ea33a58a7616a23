"""The `tailwise` app and what its commands share: store option, inputs, running a step."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from steps.core.errors import TailwiseError
from steps.core.hub import is_hub_id, store_hub_model
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
cache_app = typer.Typer(help="List and evict step cache entries.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console()

StoreOption = Annotated[str | None, typer.Option(
    "--store", envvar="TAILWISE_STORE",
    help="Artifact store: a local directory or s3://bucket/prefix [default: .tailwise/store]")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks on errors.")] = False) -> None:
    """Global options (the flag itself is read in main())."""


def run_and_report(step_name: str, params: dict, inputs: dict[str, str], store: str | None,
                   use_cache: bool = True, progress: bool = False):
    """Run one step inline (tracked in MLflow) and print its output digests."""
    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.tracking import open_tracker

    step = load_step(step_name)
    params = step.validate(params)  # before anything is opened or written
    the_store = open_store(store)
    result = run_step(step, params, inputs, store=the_store, tracker=open_tracker(),
                      use_cache=use_cache, progress=progress)
    state = "cached" if result.cached else "computed"
    for name, manifest in result.outputs.items():
        console.print(f"{step_name}.{name}: {manifest.digest}  ({state})", soft_wrap=True)
    return the_store, result


REF_PATTERN = re.compile(r"(sha256:)?[0-9a-f]{4,64}|\w+://.+")


def input_ref(the_store, ref: str, kind: str) -> str:
    """An input given as a path is stored first (a source artifact); a model may also be a
    Hub id `org/name[@revision]` (steps/core/hub.py); else an artifact ref."""
    path = Path(ref)
    if path.exists():
        if kind == "model":
            from steps.core.weights import open_weights

            open_weights(path).infos()  # reads headers only: refuses a corrupt file early
        return the_store.put(path, kind).digest
    if kind == "model" and is_hub_id(ref):
        return store_hub_model(the_store, ref)
    if REF_PATTERN.fullmatch(ref):
        return the_store.resolve(ref)
    hub = ", a Hub id org/name[@revision]" if kind == "model" else ""
    raise TailwiseError(f"{kind} {ref}: no such file or directory (give a path{hub} or an "
                        "artifact digest)")


def read_output(the_store, digest: str, output: Path | None = None):
    """A table artifact, also written to `output` when one is given."""
    import pyarrow.parquet as pq

    if output is not None:
        return pq.read_table(the_store.get(digest, output))
    with tempfile.TemporaryDirectory() as scratch:
        return pq.read_table(the_store.get(digest, Path(scratch) / "table.parquet"))


def key_values(items: list[str] | None) -> dict:
    """KEY=VALUE options; numbers and true/false become JSON values."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TailwiseError(f"--option {item!r}: expected KEY=VALUE")
        values[key] = json.loads(value) if re.fullmatch(r"[-+\d.eE]+|true|false|null", value) \
            else value
    return values
