"""`tailwise run FLOW` and `tailwise flows`: run any flow with validated params; list them.

Params come from `--params FILE` (YAML or JSON) and `--param KEY=VALUE` (later wins);
`settings.KEY` reaches the flow's RunSettings. Everything is validated by the flow's own
pydantic models before anything starts. The flow runs here on the embedded default
(ephemeral Prefect, local store, SQLite MLflow) or on $PREFECT_API_URL when set;
`--deployment` submits it to its served deployment instead.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from rich.markup import escape
from rich.table import Table

from steps.core.errors import ParamsError, TailwiseError, one_line
from tailwise_cli.app import app, console, print_table

DIGEST = re.compile(r"[0-9a-f]{64}")
NONE_WORDS = ("null", "none", "~")


@app.command("run")
def run_command(
    flow: Annotated[str | None, typer.Argument(help="Flow name (see --list).")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="KEY=VALUE, repeatable; settings.KEY sets a run setting (e.g. "
        "settings.executor=threads); lists as [0.5, 0.7]; null for None.")] = None,
    params_file: Annotated[Path | None, typer.Option(
        "--params", help="YAML or JSON file of params (a `settings:` mapping inside sets run "
        "settings); --param overrides it.")] = None,
    deployment: Annotated[bool, typer.Option(
        "--deployment", help="Submit to the flow's served deployment on $PREFECT_API_URL "
        "(`make up`) instead of running here.")] = False,
    list_flows: Annotated[bool, typer.Option("--list", help="List the flows and their params.")]
    = False,
) -> None:
    """Run a flow (on the embedded default, or $PREFECT_API_URL) and say where to look."""
    prefect_defaults()
    from flows.registry import FLOWS, lookup

    if list_flows or flow is None:
        print_flows(FLOWS)
        return
    entry = lookup(flow)
    values = read_params_file(params_file) if params_file else {}
    params, settings = entry.validate(merge(values, assignments(param or [])))
    if deployment:
        submit(entry, params, settings)
        return
    run_flow(entry, params, settings)


@app.command("flows")
def flows_command() -> None:
    """List the flows (`tailwise run FLOW`) with their params, defaults and descriptions."""
    from flows.registry import FLOWS

    print_flows(FLOWS)


def print_flows(flows: Mapping[str, Any]) -> None:
    from flows.common import RunSettings

    for name, entry in flows.items():
        console.print(f"\n[bold]{name}[/]: {entry.description}", soft_wrap=True)
        console.print(params_table(entry.params))
    console.print("\n[bold]settings[/] of every flow (--param settings.KEY=VALUE)")
    console.print(params_table(RunSettings))


def params_table(model: Any) -> Table:
    table = Table(box=None, pad_edge=False, show_header=False)
    for column in ("param", "type", "default", "description"):
        table.add_column(column, overflow="fold", no_wrap=column in ("param", "type"),
                         style="cyan" if column == "param" else None)
    for name, field in model.model_fields.items():
        default = "(required)" if field.is_required() else repr(field.get_default(
            call_default_factory=True))
        table.add_row(*map(escape, (f"  {name}", type_name(field.annotation), default,
                                    field.description or "")))
    return table


def type_name(annotation: Any) -> str:
    """`int`, `float | None`, `wanda|sparsegpt` (a Literal's choices): what a value must be."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(choice) for choice in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args if a is not ...)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


# ----------------------------------------------------------------------------- params


def assignments(items: list[str]) -> dict[str, Any]:
    """--param KEY=VALUE items as a nested mapping (dotted keys nest)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--param {item!r}: expected KEY=VALUE")
        values = merge(values, nested(key.strip(), parse_value(key, text)))
    return values


def parse_value(key: str, text: str) -> Any:
    """A lists/mapping or null as YAML; any other value stays text for pydantic to convert
    to the param's type ("8" -> 8 for an int, kept "8" for a digest prefix)."""
    import yaml

    if text.strip().lower() in NONE_WORDS:
        return None
    if text.strip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ParamsError(f"--param {key}: {text!r} is not a YAML/JSON list or mapping "
                              f"({one_line(str(exc).splitlines()[0])})") from exc
    return text


def nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        if not part:
            raise ParamsError(f"--param {key}: empty name in a dotted key")
        value = {part: value}
    return value


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` over `base`; mappings merge key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_params_file(path: Path) -> dict[str, Any]:
    """A params file: one YAML (or JSON, which is YAML) mapping of param names to values."""
    import yaml

    if not path.is_file():
        raise ParamsError(f"--params {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamsError(f"--params {path}: not a YAML or JSON file "
                          f"({one_line(str(exc).splitlines()[0])})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"--params {path}: expected a mapping of param names to values, "
                          f"got a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- running


def run_flow(entry: Any, params: Any, settings: Any, note: str | None = None) -> None:
    """Run the flow in this process, then print its result (and `note`) and where to look."""
    from prefect.settings import PREFECT_API_URL

    where = PREFECT_API_URL.value() or "the embedded Prefect (ephemeral)"
    console.print(f"running flow {entry.name} on {where}; each step logs when it is "
                  "computed or reused (cached)", soft_wrap=True)
    try:
        state = entry.flow(params, settings, return_state=True)
        result = state.result()
    except KeyboardInterrupt:
        print(f"interrupted: the store holds only whole artifacts of the steps that finished "
              f"(nothing half-written). Resume with: {resume_command()} (every finished step "
              "is reused)", file=sys.stderr)
        raise typer.Exit(130) from None
    show_result(entry.name, result)
    if note:
        console.print(note, soft_wrap=True)
    where_to_look(result, settings, str(state.state_details.flow_run_id))


def prefect_defaults() -> None:
    """Before Prefect is imported (it reads its settings then): its ephemeral API server can
    take longer than its 20 s default to start on a small machine."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def resume_command() -> str:
    return shlex.join(["tailwise", *sys.argv[1:]])


def submit(entry: Any, params: Any, settings: Any) -> None:
    """Create a run of the flow's deployment on the Prefect server; a worker runs it."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise TailwiseError("--deployment needs a Prefect server with the deployments served: "
                            "set PREFECT_API_URL (`make up` prints it)")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"{entry.name}/{entry.deployment}"
    try:
        flow_run = run_deployment(name, parameters={
            "params": params.model_dump(mode="json"),
            "settings": settings.model_dump(mode="json")}, timeout=0, as_subflow=False)
    except ObjectNotFound as exc:
        raise TailwiseError(f"no deployment {name} on {api}: register the flows' deployments "
                            "(`make up`, or serve flows/deployments.py)") from exc
    console.print(f"submitted {name}: flow run {flow_run.name} ({flow_run.id}) on {api}",
                  soft_wrap=True)
    console.print(f"follow it: prefect flow-run logs {flow_run.id}", soft_wrap=True)


# ----------------------------------------------------------------------------- reporting


def show_result(flow: str, result: Any) -> None:
    """Tables for lists of rows, one line per other value (digests as they are)."""
    console.rule(f"{flow} finished")
    if is_rows(result):
        print_table(rows_table(result))
        return
    for key, value in (result.items() if isinstance(result, dict) else [("result", result)]):
        if is_rows(value):
            print_table(rows_table(value, title=key))
        elif hasattr(value, "outputs"):  # a StepResult
            state = "cached" if value.cached else "computed"
            for name, manifest in value.outputs.items():
                console.print(f"{key}.{name}: {manifest.digest}  ({state})", soft_wrap=True)
        else:
            console.print(f"{key}: {value}", soft_wrap=True, markup=False)


def is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def rows_table(rows: list[dict], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column, justify="right" if isinstance(rows[0].get(column), float | int)
                         else "left")
    for row in rows:
        table.add_row(*(escape(cell(row.get(column))) for column in columns))
    return table


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and DIGEST.fullmatch(value):
        return value[:12]
    return str(value)


def where_to_look(result: Any, settings: Any, flow_run_id: str) -> None:
    """The store, the MLflow parent run, the HT-SR reports and the lineage command."""
    from steps.core.store import open_store

    store = open_store(settings.store)
    console.print(f"artifact store : {store.url}", soft_wrap=True)
    if settings.tracking:
        mlflow_pointer(settings.tracking_uri, flow_run_id)
    final = final_artifact(store, result)
    if final is None:
        return
    digest, graph = final
    for report in spectral_reports(store, graph):
        console.print(f"HT-SR report   : {report}", soft_wrap=True)
    console.print(f"audit it       : tailwise lineage {digest[:12]}", soft_wrap=True)


def mlflow_pointer(tracking_uri: str | None, flow_run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    from steps.core.tracking import EXPERIMENT, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1,
                              filter_string=f"tags.`tailwise.flow_run_id` = '{flow_run_id}'") \
        if experiment else []
    if runs:
        console.print(f"MLflow         : parent run {runs[0].info.run_id} in {uri}",
                      soft_wrap=True)
    if uri.startswith("sqlite:"):
        console.print(f"                 browse: mlflow ui --backend-store-uri {uri}",
                      soft_wrap=True)


def final_artifact(store: Any, result: Any) -> tuple[str, Any] | None:
    """The result's artifact with the longest lineage (the flow's end product) and its graph."""
    from steps.core.errors import ArtifactNotFound
    from steps.core.lineage import upstream

    best = None
    for digest in dict.fromkeys(digests_in(result)):
        try:
            graph = upstream(store, digest)
        except ArtifactNotFound:
            continue
        if best is None or len(graph.steps) >= len(best[1].steps):
            best = (digest, graph)
    return best


def digests_in(value: Any) -> list[str]:
    if hasattr(value, "digests"):  # a StepResult
        return list(value.digests().values())
    if isinstance(value, str):
        return [value] if DIGEST.fullmatch(value) else []
    if isinstance(value, dict):
        return [d for v in value.values() for d in digests_in(v)]
    if isinstance(value, list | tuple):
        return [d for v in value for d in digests_in(v)]
    return []


def spectral_reports(store: Any, graph: Any) -> list[Path]:
    """The HT-SR report pages (a spectral step's `report` output) in a lineage, as files."""
    reports = []
    for made in graph.steps.values():
        entry = store.cache_get(made.cache_key) if made.step == "spectral" and \
            made.cache_key else None
        digest = (entry or {}).get("outputs", {}).get("report")
        if digest:
            path = Path(".tailwise") / "reports" / f"report-{digest[:12]}.html"
            reports.append(path if path.is_file() else store.get(digest, path))
    return reports
