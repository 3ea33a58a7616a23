"""`tailwise lineage`: show, check, compare, search and export what made every artifact.

`tailwise lineage REF` is short for `tailwise lineage show REF`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from steps.core.errors import TailwiseError
from steps.core.lineage import (
    FORMATS,
    annotate_metrics,
    downstream,
    render,
    upstream,
)
from steps.core.lineage_check import CACHE_ENTRY
from steps.core.lineage_diff import flat
from steps.core.store import digest_from_ref, open_store
from tailwise_cli.app import StoreOption, app, console, key_values, print_table


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
    """Re-hash REF and its chain against the manifests; exit 1 on any finding.

    Each finding is printed as it is made (JSON too is written as it goes), so a check of a
    large store shows its progress and keeps a flat memory."""
    from steps.core import lineage_check as lc

    fmt = text_or_json(fmt)
    if (ref is None) == (not all_):
        raise TailwiseError("give an artifact REF or --all (not both)")
    the_store = open_store(store)
    the_store.require_artifacts()
    what = lc.scope(the_store, None if all_ else ref, downstream_)
    report = CheckReport(fmt)
    with CheckProgress(what.count) as progress:
        for finding in lc.check(the_store, what, progress.advance, progress.next_artifact):
            report.add(finding)
    report.close(what.count, progress.content_bytes)
    if report.problems:
        raise typer.Exit(1)


class CheckReport:
    """Writes findings as they come: one line each, or one JSON document written as it goes."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.written = self.problems = self.cache_entries = 0
        if fmt == "json":
            sys.stdout.write('{\n  "findings": [')

    def add(self, finding) -> None:
        self.problems += not finding.ok
        self.cache_entries += finding.about == CACHE_ENTRY
        if self.fmt == "json":
            separator = "," if self.written else ""
            sys.stdout.write(f"{separator}\n    {json.dumps(finding.to_json())}")
        else:
            print(finding.line())
        self.written += 1

    def close(self, artifacts: int, content_bytes: int) -> None:
        if self.fmt == "json":
            sys.stdout.write(f'\n  ],\n  "problems": {self.problems},\n  "artifacts": {artifacts},'
                             f'\n  "cache_entries": {self.cache_entries}\n}}\n')
            return
        print(f"checked {artifacts} artifacts ({content_bytes / 1e6:.1f} MB of content) and "
              f"{self.cache_entries} cache entries: "
              + (f"{self.problems} problem(s)" if self.problems else "all ok"))


class CheckProgress:
    """A bar on stderr (when it is a terminal) counting artifacts, the one being checked in
    step with its bytes re-hashed, so one large model moves the bar as well as many small."""

    def __init__(self, artifacts: int, console: Console | None = None) -> None:
        self.artifacts = artifacts
        self.console = console or Console(stderr=True)
        self.content_bytes = 0
        self.size = 0  # of the artifact being checked
        self.done: float | None = None  # of it, as a fraction (None: none started)
        self.bar = self.task = None

    def __enter__(self) -> CheckProgress:
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            # stdout goes through the bar's console only when it is the same terminal.
            self.bar = Progress(TextColumn("re-hashing"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("artifacts, {task.fields[mb]:.0f} MB"),
                                TimeRemainingColumn(), console=self.console, transient=True,
                                redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
            self.bar.start()
            self.task = self.bar.add_task("check", total=self.artifacts, mb=0.0)
        return self

    def next_artifact(self, loaded) -> None:
        if self.done is not None:
            self._step(1.0 - self.done)
        self.size = loaded.manifest.size if loaded.manifest else 0
        self.done = 0.0
        self.content_bytes += self.size

    def advance(self, nbytes: int) -> None:
        if self.size and self.done is not None:
            share = min(nbytes / self.size, 1.0 - self.done)
            self.done += share
            self._step(share, nbytes)

    def _step(self, artifacts: float, nbytes: int = 0) -> None:
        if self.bar is not None:
            mb = self.bar.tasks[0].fields["mb"] + nbytes / 1e6
            self.bar.update(self.task, advance=artifacts, mb=mb)

    def __exit__(self, *exc) -> None:
        if self.done is not None:
            self._step(1.0 - self.done)
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
    shown = key_params(matches, list(key_values(param)))
    table = Table("digest", "kind", "step", "params", "created (UTC)", box=box.SIMPLE_HEAD)
    for column in table.columns:
        column.no_wrap = column.header != "params"
    table.columns[3].overflow = "fold"  # whole values, over more lines
    for m in matches:
        values = flat(m.params, "")
        table.add_row(m.digest[:12], m.kind, m.step or "-",
                      "  ".join(f"{k}={json.dumps(values[k])}" for k in shown[m.step]
                                if k in values),
                      m.created_at[:16].replace("T", " "))
    print_table(table)
    console.print(f"{total} matches" + (f" (newest {len(matches)} shown)"
                                        if len(matches) < total else ""))


UNSET = (None, False, "", [], {})


def key_params(matches: list, asked: list[str]) -> dict[str | None, list[str]]:
    """For each step, the params worth showing: those asked for, then those whose values tell
    its matches apart (nested keys dotted) or, when none does, those set to something."""
    by_step: dict[str | None, list[dict]] = {}
    for m in matches:
        by_step.setdefault(m.step, []).append(flat(m.params, ""))
    shown = {}
    for step, rows in by_step.items():
        keys = sorted({k for row in rows for k in row})
        differ = [k for k in keys if len({json.dumps(row.get(k)) for row in rows}) > 1]
        telling = differ or [k for k in keys if any(row.get(k) not in UNSET for row in rows)]
        shown[step] = [k for k in asked if k in keys] + [k for k in telling if k not in asked]
    return shown


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
    table = Table("digest", "kind", "step", "why", box=box.SIMPLE_HEAD)
    for item in found:
        table.add_row(item.digest[:12], item.kind, item.step, item.reason)
    print_table(table)
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
