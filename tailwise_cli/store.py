"""`tailwise store` and `tailwise cache`: look into the artifact store and the step cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steps.core.errors import TailwiseError
from steps.core.store import open_store
from tailwise_cli.app import SOURCE_KINDS, StoreOption, cache_app, console, put_source, store_app


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
              kind: Annotated[str, typer.Option(
                  help=f"Artifact kind: {', '.join(SOURCE_KINDS)}.")],
              store: StoreOption = None) -> None:
    """Add a file or directory (e.g. your own HF model dir) as a source artifact."""
    if not path.exists():
        raise TailwiseError(f"{path}: no such file or directory")
    the_store = open_store(store)
    manifest = put_source(the_store, path, kind)
    print(json.dumps({"digest": manifest.digest, "uri": the_store.uri(manifest.digest)}))


@cache_app.command("ls")
def cache_ls(step: Annotated[str | None, typer.Option(help="Only this step.")] = None,
             store: StoreOption = None) -> None:
    """List cached step results: cache key, step, outputs, the run that computed them."""
    table = Table("key", "step", "outputs", "flow run", "created")
    entries = sorted(open_store(store).cache_entries(), key=lambda e: e[1].get("created_at", ""))
    for key, entry in entries:
        if step in (None, entry.get("step")):
            outputs = ", ".join(f"{k}={v[:12]}" for k, v in entry.get("outputs", {}).items())
            table.add_row(key[:12], entry.get("step", "?"), outputs,
                          str(entry.get("flow_run_id") or "-"), entry.get("created_at", ""))
    console.print(table)


@cache_app.command("rm")
def cache_rm(keys: Annotated[list[str] | None, typer.Argument(
                 help="Cache keys or unique prefixes.")] = None,
             step: Annotated[str | None, typer.Option(help="Every entry of this step.")] = None,
             all_: Annotated[bool, typer.Option("--all", help="Every entry.")] = False,
             store: StoreOption = None) -> None:
    """Evict cache entries, so the next run recomputes them (artifacts stay in the store)."""
    the_store = open_store(store)
    entries = the_store.cache_entries()
    chosen = {key for key, entry in entries
              if all_ or entry.get("step") == step or any(key.startswith(k) for k in keys or [])}
    if not chosen and not (keys or step or all_):
        raise TailwiseError("cache rm: name cache keys, --step NAME or --all")
    for key in sorted(chosen):
        the_store.cache_delete(key)
    console.print(f"evicted {len(chosen)} cache entr{'y' if len(chosen) == 1 else 'ies'}")
