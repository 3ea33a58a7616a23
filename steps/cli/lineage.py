"""`tailwise lineage`: show, check, compare, search and export what made every artifact.

`tailwise lineage REF` is short for `tailwise lineage show REF`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from steps.cli.app import StoreOption, app, console, key_values
from steps.core.errors import TailwiseError
from steps.core.lineage import (
    FORMATS,
    annotate_metrics,
    downstream,
    params_text,
    render,
    upstream,
)
from steps.core.store import digest_from_ref, open_store

# Re-hashing more than this shows a progress bar (on stderr, so stdout stays the report).
PROGRESS_BYTES = 256 * 1024 * 1024


class RefOrCommand(TyperGroup):
    """A group whose first argument, when it is not a subcommand, is the REF of `show`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["show", *args]
        return super().parse_args(ctx, args)


lineage_app = typer.Typer(
    cls=RefOrCommand, no_args_is_help=True,
    help="What made an artifact, and proof of it: `tailwise lineage REF` shows its lineage "
    "(same as `show`); the subcommands check, compare, search and export it.")
app.add_typer(lineage_app, name="lineage")

RefArgument = Annotated[str, typer.Argument(help="Artifact digest, unique digest prefix or URI.")]
JsonFormat = Annotated[str, typer.Option("--format", "-f", help="text or json.")]


def text_or_json(fmt: str) -> str:
    if fmt not in ("text", "json"):
        raise TailwiseError(f"--format {fmt!r} is not one of text, json")
    return fmt


@lineage_app.command()
def show(
    ref: RefArgument,
    downstream_: Annotated[bool, typer.Option(
        "--downstream", help="Show what was built from REF instead of what made it.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f",
                                     help=f"One of: {', '.join(FORMATS)}.")] = "text",
    namespace: Annotated[str | None, typer.Option(
        help="OpenLineage job namespace [default: $OPENLINEAGE_NAMESPACE or tailwise]")] = None,
    store: StoreOption = None,
) -> None:
    """Show which steps, params and inputs made an artifact (or what was built from it)."""
    if fmt not in FORMATS:
        raise TailwiseError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    the_store = open_store(store)
    graph = (downstream if downstream_ else upstream)(the_store, ref)
    if fmt == "html":
        annotate_metrics(the_store, graph)
    print(render(graph, fmt, namespace))


@lineage_app.command()
def check(
    ref: Annotated[str | None, typer.Argument(
        help="Artifact digest, prefix or URI (leave out with --all).")] = None,
    downstream_: Annotated[bool, typer.Option(
        "--downstream", help="Check what was built from REF instead of what made it.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Check every artifact and cache entry "
                                       "of the store.")] = False,
    fmt: JsonFormat = "text",
    store: StoreOption = None,
) -> None:
    """Re-hash REF and its chain against the manifests; exit 1 on any finding."""
    from steps.core import lineage_check as lc

    fmt = text_or_json(fmt)
    if (ref is None) == (not all_):
        raise TailwiseError("give an artifact REF or --all (not both)")
    the_store = open_store(store)
    the_store.require_artifacts()
    loaded = lc.targets(the_store, None if all_ else ref, downstream_)
    cache = lc.cache_keys(the_store) if all_ else lc.cache_keys_of(loaded, the_store)
    total = sum(item.manifest.size for item in loaded if item.manifest)
    with ProgressBar(total) as advance:
        findings = list(lc.check(the_store, loaded, cache, advance))
    bad = [f for f in findings if not f.ok]
    if fmt == "json":
        print(json.dumps({"findings": [f.to_json() for f in findings], "problems": len(bad),
                          "artifacts": len(loaded), "cache_entries": len(cache)}, indent=2))
    else:
        for finding in findings:
            print(finding.line())
        print(f"checked {len(loaded)} artifacts ({total / 1e6:.1f} MB of content) and "
              f"{len(cache)} cache entries: " + (f"{len(bad)} problem(s)" if bad else "all ok"))
    if bad:
        raise typer.Exit(1)


class ProgressBar:
    """A byte progress bar on stderr for large checks; a no-op callback otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None

    def __enter__(self):
        if self.total < PROGRESS_BYTES:
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress("re-hashing", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("check", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@lineage_app.command()
def diff(
    a: Annotated[str, typer.Argument(help="First artifact (digest, prefix or URI).")],
    b: Annotated[str, typer.Argument(help="Second artifact.")],
    fmt: JsonFormat = "text",
    store: StoreOption = None,
) -> None:
    """Compare two artifacts' lineages: steps, versions, params, inputs, git, images."""
    from steps.core import lineage_diff as ld

    fmt = text_or_json(fmt)
    digest_a, digest_b, rows = ld.compare(open_store(store), a, b)
    if fmt == "json":
        print(json.dumps(ld.to_json(digest_a, digest_b, rows), indent=2))
    else:
        print(ld.to_text(digest_a, digest_b, rows))


@lineage_app.command()
def find(
    step: Annotated[str | None, typer.Option(help="Made by this step.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE a param of the producing step must have (repeatable; nested keys "
        "dotted).")] = None,
    kind: Annotated[str | None, typer.Option(help="Artifacts of this kind.")] = None,
    since: Annotated[str | None, typer.Option(help="Made on or after this date (YYYY-MM-DD) "
                                              "or ISO date-time (UTC unless it says).")] = None,
    produced_from: Annotated[str | None, typer.Option(
        help="Built, directly or not, from this artifact (digest or prefix).")] = None,
    git: Annotated[str | None, typer.Option(help="Made at this git revision (prefix), of the "
                                            "repository or of the step's folder.")] = None,
    limit: Annotated[int, typer.Option(help="Show the newest N matches (0: all).")] = 50,
    fmt: JsonFormat = "text",
    store: StoreOption = None,
) -> None:
    """Search the store's manifests (through a local index rebuilt from them)."""
    from steps.core.lineage_index import LineageIndex, Query, since_timestamp

    fmt = text_or_json(fmt)
    query = Query(step=step, params=tuple(key_values(param).items()), kind=kind,
                  since=since and since_timestamp(since),
                  produced_from=produced_from and digest_from_ref(produced_from),
                  git=git and git.lower())
    index = LineageIndex(open_store(store))
    try:
        index.refresh()
        total, matches = index.find(query, limit or None)
    finally:
        index.close()
    if fmt == "json":
        print(json.dumps({"total": total, "matches": [m.to_json() for m in matches]}, indent=2))
        return
    table = Table("digest", "kind", "step", "params", "created")
    for m in matches:
        table.add_row(m.digest[:12], m.kind, m.step or "-", _cut(params_text(m.params), 60),
                      m.created_at[:19])
    console.print(table)
    console.print(f"{total} matches" + (f" (newest {len(matches)} shown)"
                                        if len(matches) < total else ""))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


@lineage_app.command()
def stale(fmt: JsonFormat = "text", store: StoreOption = None) -> None:
    """Artifacts whose step has another version or code now, and everything built from them."""
    from steps.core.lineage_stale import find_stale

    fmt = text_or_json(fmt)
    the_store = open_store(store)
    the_store.require_artifacts()
    found = find_stale(the_store)
    if fmt == "json":
        print(json.dumps([s.to_json() for s in found], indent=2))
        return
    table = Table("digest", "kind", "step", "why")
    for item in found:
        table.add_row(item.digest[:12], item.kind, item.step, item.reason)
    console.print(table)
    console.print(f"{len(found)} stale artifacts" + (
        "; a flow run with settings.recompute_stale recomputes them" if found else ""))


@lineage_app.command()
def resend(
    file: Annotated[Path | None, typer.Option(
        help="File of unsent events [default: $TAILWISE_OPENLINEAGE_UNSENT or "
        ".tailwise/openlineage/unsent.jsonl]")] = None,
) -> None:
    """Send the OpenLineage events that a flow could not deliver (endpoint down)."""
    from steps.core import openlineage as ol

    path = file or ol.unsent_path()
    if not ol.configured():
        raise TailwiseError("no OpenLineage endpoint is configured: set OPENLINEAGE_URL (or "
                            "OPENLINEAGE_CONFIG / openlineage.yml)")
    emitter = ol.Emitter.from_environment()
    sent, left = ol.resend(path, emitter.client)
    print(f"sent {sent} events" + (f"; {left} left in {path}" if left else ""))
    if left:
        sys.exit(1)
