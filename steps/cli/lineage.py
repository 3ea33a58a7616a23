"""`tailwise lineage`: what made an artifact, or what was built from it."""

from __future__ import annotations

from typing import Annotated

import typer

from steps.cli.app import StoreOption, app
from steps.core.errors import TailwiseError
from steps.core.lineage import FORMATS, downstream, render, upstream
from steps.core.store import open_store


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
