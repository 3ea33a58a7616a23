"""The `tailwise` app and what its commands share: store option, inputs, running a step."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from steps.core.errors import TailwiseError
from steps.core.hub import is_hub_id, store_hub_model
from steps.core.store import ArtifactStore, open_store

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


class Options:
    """Global options of this invocation."""

    quiet = False


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bars (results and errors still print).")] = False,
) -> None:
    """Global options (--debug itself is read in main())."""
    Options.quiet = quiet
    if quiet:  # nor the bars of Hugging Face libraries (read when they are imported)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def validate_request(step_name: str, params: dict, inputs: Iterable[str]) -> None:
    """Refuse bad params, and params that conflict with the inputs named, before any input is
    read or stored (a model can take a while to hash)."""
    from steps.core.registry import load_step

    load_step(step_name).validate(params, inputs)


def run_and_report(step_name: str, params: dict, inputs: dict[str, str], store,
                   use_cache: bool = True, progress: bool = True):
    """Run one step inline (tracked in MLflow) and print its output digests; a progress bar
    on stderr unless --quiet. `store`: a URL or an open store."""
    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.tracking import open_tracker

    step = load_step(step_name)
    params = step.validate(params, inputs)  # before anything is opened or written
    the_store = store if isinstance(store, ArtifactStore) else open_store(store)
    try:
        result = run_step(step, params, inputs, store=the_store, tracker=open_tracker(),
                          use_cache=use_cache, progress=progress and not Options.quiet)
    except TailwiseError as exc:
        raise TailwiseError(users_paths(str(exc), inputs)) from exc
    state = "cached" if result.cached else "computed"
    for name, manifest in result.outputs.items():
        console.print(f"{step_name}.{name}: {manifest.digest}  ({state})", soft_wrap=True)
    return the_store, result


# A step's scratch copy of an input: <tmp>/tailwise-<step>-<random>/inputs/<name>[.suffix]
SCRATCH_INPUT = re.compile(r"[^\s'\"]*/tailwise-\w+-[^/\s]+/inputs/(\w+)(?:\.[\w.]+)?")
# What the user typed for each input digest (input_ref records it), to name it in errors.
_USER_ARGS: dict[str, str] = {}


def users_paths(message: str, inputs: dict[str, str]) -> str:
    """An error message with the step's scratch copies of inputs named as the user gave them."""
    def users_arg(match: re.Match) -> str:
        return _USER_ARGS.get(inputs.get(match.group(1), ""), match.group(0))

    return SCRATCH_INPUT.sub(users_arg, message)


REF_PATTERN = re.compile(r"(sha256:)?[0-9a-f]{4,64}|\w+://.+")
# The built-in text corpora: NAME[:SPLIT], made by the build_text step as flows make them.
CORPUS_PATTERN = re.compile(r"(kjv|fortunes)(?::(train|validation|test))?")


# The kinds of artifact a user may add by hand: those that steps read.
SOURCE_KINDS = ("model", "text", "text-classification", "decisions", "metrics", "md-tree")


def put_source(the_store, path: Path, kind: str):
    """Store a user's file or directory as a source artifact, after checking it is one."""
    if kind not in SOURCE_KINDS:
        raise TailwiseError(f"kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if kind == "model":
        from steps.core.weights import open_weights

        if not open_weights(path).infos():  # reads headers only: refuses a corrupt file early
            raise TailwiseError(f"model {path}: no weight matrices in it")
    return the_store.put(path, kind)


def input_ref(the_store, ref: str, kind: str, corpus_split: str = "train") -> str:
    """An input given as a path is stored first (a source artifact); a model may also be a
    Hub id `org/name[@revision]` (steps/core/hub.py), a text a built-in corpus (`kjv:test`;
    `kjv` alone is its `corpus_split`); else an artifact ref."""
    path = Path(ref)
    if path.exists():
        digest = put_source(the_store, path, kind).digest
    elif kind == "model" and is_hub_id(ref):
        digest = store_hub_model(the_store, ref)
    elif kind == "text" and (corpus := CORPUS_PATTERN.fullmatch(ref)):
        params = {"corpus": corpus.group(1), "split": corpus.group(2) or corpus_split}
        _, built = run_and_report("build_text", params, {}, the_store)
        digest = built.outputs["text"].digest
    elif REF_PATTERN.fullmatch(ref):
        digest = the_store.resolve(ref)
    else:
        hint = {"text": " or a built-in corpus (kjv:train, kjv:validation, kjv:test, fortunes)",
                "model": " or a Hub id org/name[@revision]"}.get(kind, "")
        raise TailwiseError(f"{kind} {ref}: no such file or directory (give a path, an "
                            f"artifact digest{hint})")
    _USER_ARGS[digest] = ref
    return digest


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


def print_table(table: Table) -> None:
    """On a terminal, fit its width; in a file or pipe (80 columns to rich), keep every cell
    whole on one line."""
    if console.is_terminal:
        console.print(table)
        return
    width = Console(width=10_000).measure(table).maximum
    Console(width=width, no_color=console.no_color).print(table)
