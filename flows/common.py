"""What every flow shares: where artifacts and tracking go, and how a step is run as a task.

Flows only compose: they name steps, params and input digests. The numerical work
happens in `steps/`, imported by name when a task runs, so this module never
imports torch. A flow is a few lines:

    @flow
    def my_flow(params: MyParams = MyParams(), settings: RunSettings = RunSettings()):
        with flow_run_context("my_flow", settings, params.model_dump()) as run:
            model = run.step("build_model", {"name": params.model})
            run.step("spectral", {}, {"model": model.digests()["model"]})

Independent steps run in parallel with `run.submit` (same arguments as `run.step`), which
returns a future; `future.result()` is the step's result. Where they run is the
`executor` setting, so a deployment picks it per run from its parameters:

- sequential: each `submit` runs the step at once, in the flow's thread (the default);
- threads: a thread pool in the flow's process (`workers` threads);
- dask: a Dask cluster, through prefect-dask's `DaskTaskRunner`: a local
  `distributed.LocalCluster` of `workers` processes (1 thread each, on 127.0.0.1) started
  for the flow run, or the running cluster at `dask_address` (e.g. `tcp://10.0.0.5:8786`).

A flow's task runner is fixed when the flow starts (`@flow(task_runner=...)`), so the chosen
runner is entered by the flow's body instead (`flow_run_context`), on first use, and step
tasks go through its `submit` exactly as `task.submit` hands them to the flow's own runner:
same task, same Prefect task runs under the flow run, same cache and reports. Dask workers
get the flow run's store and tracker by URL (`FlowRun.__getstate__`); a remote cluster's
workers need the store's credentials (AWS_*) in their own environment.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.assets import materialize
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, model_validator

from flows.runners import RUNNERS, Dispatch
from steps.core.errors import ArtifactNotFound, ParamsError
from steps.core.hub import is_hub_id, store_hub_model
from steps.core.jobs import retry_policy
from steps.core.lineage import annotate_metrics, to_html, upstream_of_all
from steps.core.lineage_stale import find_stale
from steps.core.openlineage import Emitter, default_namespace, flow_event, step_events
from steps.core.registry import load_step
from steps.core.step import StepResult, cached_result
from steps.core.store import ArtifactStore, now, open_store
from steps.core.tracking import NullTracker, open_tracker

RunnerName = Literal["inline", "process", "deployment"]
ExecutorName = Literal["sequential", "threads", "dask"]


class RunSettings(BaseModel):
    """Where a flow keeps its artifacts, records its runs, and runs its steps."""

    store: str | None = Field(None, description="Artifact store URL: a directory or "
                              "s3://bucket/prefix (default $TAILWISE_STORE or .tailwise/store).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default "
                                     "$MLFLOW_TRACKING_URI or .tailwise/mlflow.db).")
    tracking: bool = Field(True, description="Record runs in MLflow.")
    use_cache: bool = Field(True, description="Reuse outputs of steps already computed.")
    no_cache: list[str] = Field(default_factory=list,
                                description="Steps to recompute even when cached.")
    runner: RunnerName = Field("inline", description="Where steps run: in the flow's process, "
                               "as a subprocess (the container command), or as their own "
                               "Prefect deployment on a work pool.")
    executor: ExecutorName = Field("sequential", description="How steps submitted together "
                                   "run: one after the other, on threads of the flow's "
                                   "process, or on a Dask cluster.")
    workers: int = Field(2, ge=1, description="Threads (threads), or worker processes of the "
                         "local Dask cluster (dask without an address).")
    dask_address: str | None = Field(None, description="Scheduler of a running Dask cluster, "
                                     "e.g. tcp://10.0.0.5:8786 (dask only; None: start a "
                                     "local cluster for the run).")
    recompute_stale: bool = Field(False, description="Recompute the cached steps whose outputs "
                                  "are stale (`tailwise lineage stale`: made by another version "
                                  "or code of their step, or built from such outputs).")
    openlineage_namespace: str | None = Field(None, description="OpenLineage job namespace of "
                                              "the events sent when OPENLINEAGE_URL (or the "
                                              "client's config) is set (default "
                                              "$OPENLINEAGE_NAMESPACE or tailwise).")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunSettings:
        if self.dask_address and self.executor != "dask":
            raise ValueError(f"dask_address {self.dask_address!r} is set but executor is "
                             f"{self.executor!r}: set executor to 'dask' or drop the address")
        return self


class StepFuture(Protocol):
    """What `FlowRun.submit` returns: a Prefect future, or a step already run."""

    def result(self) -> StepResult: ...


@dataclass(frozen=True)
class Recorded:
    """A step's future that notes the step's outputs in the flow run when it is read."""

    future: Any
    outputs: list[str]

    def result(self) -> StepResult:
        result = self.future.result()
        self.outputs.extend(result.digests().values())
        return result


@dataclass(frozen=True)
class Ran:
    """The future of a step that ran at submission (the sequential executor)."""

    value: StepResult

    def result(self) -> StepResult:
        return self.value


@dataclass
class FlowRun:
    """A running flow: its store, tracker, parent MLflow run and how steps are run."""

    name: str  # the Prefect flow's name, which its steps' manifests and OpenLineage events record
    store: ArtifactStore
    tracker: NullTracker
    parent_run_id: str | None
    flow_run_id: str | None
    settings: RunSettings
    scratch: Path
    # Closes the task runner of `submit` with the flow's context; never leaves this process.
    resources: ExitStack = field(default_factory=ExitStack, repr=False, compare=False)
    task_runner: Any = field(default=None, repr=False, compare=False)
    # Outputs found stale when the run started (settings.recompute_stale), to recompute.
    stale: frozenset[str] = frozenset()
    # Sends OpenLineage events when the client is configured; per process, never pickled.
    lineage: Emitter | None = field(default=None, repr=False, compare=False)
    # What the flow's steps returned, for the lineage page of the parent MLflow run.
    outputs: list[str] = field(default_factory=list, repr=False, compare=False)

    def step(self, name: str, params: Mapping[str, Any] | None = None,
             inputs: Mapping[str, str] | None = None, label: str | None = None) -> StepResult:
        """Run step `name` as a Prefect task (or reuse its cached outputs)."""
        result = step_options(name, label)(self, name, dict(params or {}), dict(inputs or {}))
        self.outputs.extend(result.digests().values())
        return result

    def submit(self, name: str, params: Mapping[str, Any] | None = None,
               inputs: Mapping[str, str] | None = None, label: str | None = None) -> StepFuture:
        """Start step `name` on the settings' executor; `.result()` waits for its result."""
        if self.settings.executor == "sequential":
            return Ran(self.step(name, params, inputs, label))
        parameters = {"run": self, "name": name, "params": dict(params or {}),
                      "inputs": dict(inputs or {})}
        return Recorded(self.runner().submit(step_options(name, label), parameters),
                        self.outputs)

    def runner(self) -> Any:
        """The executor's Prefect task runner, started on first use, closed with the flow."""
        if self.task_runner is None:
            self.task_runner = self.resources.enter_context(task_runner_for(self.settings))
        return self.task_runner

    def source(self, ref: str, kind: str) -> str:
        """The digest of an input given as a local path (stored first), a model's Hub id
        `org/name[@revision]` (stored with its commit, steps/core/hub.py) or an artifact ref."""
        path = Path(ref)
        if path.exists():
            return self.store.put(path, kind).digest
        if kind == "model" and is_hub_id(ref):
            return store_hub_model(self.store, ref)
        return self.store.resolve(ref)

    def dispatch(self) -> Dispatch:
        return Dispatch(self.store, self.tracker, self.parent_run_id, self.flow_run_id, self.name)

    def __getstate__(self) -> dict[str, Any]:
        # What a Dask worker gets: clients (boto3, MLflow) and the task runner stay here;
        # the worker reopens the store and the tracker from their URLs.
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("store", "tracker", "resources", "task_runner", "lineage",
                              "outputs")}
        return state | {"store_url": self.store.url, "tracking_uri": self.tracker.tracking_uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        store_url, tracking_uri = state.pop("store_url"), state.pop("tracking_uri")
        self.__dict__.update(state)
        self.store = open_store(store_url)
        self.tracker = open_tracker(tracking_uri, tracking_uri is not None)
        self.resources, self.task_runner = ExitStack(), None
        self.lineage, self.outputs = Emitter.from_environment(), []


def step_options(name: str, label: str | None) -> Any:
    """`step_task` named for the run graph, with the step's retry policy (containers/)."""
    retries, delays = retry_policy(name)
    return step_task.with_options(name=label or name, retries=retries,
                                  retry_delay_seconds=delays)


def task_runner_for(settings: RunSettings) -> Any:
    """The Prefect task runner of a parallel executor (prefect-dask is imported only here)."""
    if settings.executor == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # One task at a time per worker process; distributed's nanny also sets OMP/MKL/OpenBLAS
    # threads to 1 in each worker (its `pre-spawn-environ`), so 2 workers use 2 cores.
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": settings.workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": None})


# What the build_model step makes by name; anything else is a path or an artifact ref.
BUILT_IN_MODELS = ("tiny-gpt2", "tiny-llama", "cnn", "mlp", "minilm", "smollm2")


def model_digest(run: FlowRun, model: str) -> str:
    """The digest of a built-in model (built by the build_model step), a path, a Hub id
    or a ref (FlowRun.source)."""
    if model in BUILT_IN_MODELS:
        return run.step("build_model", {"name": model}).digests()["model"]
    return run.source(model, "model")


def is_transient(task, task_run, state) -> bool:
    """Retry what may pass (a server away), not what cannot (bad params, missing input)."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, ParamsError | ArtifactNotFound)


# Prefect's own task cache is off: steps have their content-addressed cache in the store.
# Retries are set per step from containers/steps.yaml (FlowRun.step).
@task(retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def step_task(run: FlowRun, name: str, params: dict, inputs: dict) -> StepResult:
    step = load_step(name)
    valid = step.validate(params)
    digests = {key: run.store.resolve(ref) for key, ref in inputs.items()}
    use_cache = run.settings.use_cache and name not in run.settings.no_cache
    result = use_cache and cached_result(run.store, step, valid, digests)
    if result and run.stale & set(result.digests().values()):
        get_run_logger().info("step %s: cached outputs are stale, recomputing", name)
        result = None
    if not result:
        result = RUNNERS[run.settings.runner](run.dispatch(), step, valid, digests)
        announce_assets(name, result, digests, run.store)
        if run.lineage is not None:
            emit_lineage(run, result, digests)
    report(name, result, run.store)
    return result


def announce_assets(name: str, result: StepResult, inputs: dict[str, str],
                    store: ArtifactStore) -> None:
    """Prefect asset materialisation events, so lineage also shows in Prefect's event feed."""
    outputs = [store.uri(digest) for digest in result.digests().values()]
    deps = [store.uri(digest) for digest in inputs.values()]
    materialize(*outputs, asset_deps=deps, by="tailwise", name=f"{name}-assets",
                cache_policy=NO_CACHE)(lambda: None)()


def emit_lineage(run: FlowRun, result: StepResult, inputs: dict[str, str]) -> None:
    """OpenLineage START/COMPLETE of a step that ran (an endpoint down never fails the flow)."""
    made = next(iter(result.outputs.values())).produced_by
    read = [run.store.stat(digest) for digest in sorted(set(inputs.values()))]
    run.lineage.emit(step_events(made, read, list(result.outputs.values()), run.store.url,
                                 lineage_namespace(run)))


def emit_flow_state(run: FlowRun, state: str) -> None:
    """OpenLineage event of the flow run itself (in a Prefect flow, when configured)."""
    if run.lineage is not None and run.flow_run_id:
        run.lineage.emit([flow_event(state, run.name, run.flow_run_id, lineage_namespace(run),
                                     now())])


def lineage_namespace(run: FlowRun) -> str:
    return run.settings.openlineage_namespace or default_namespace()


def report(name: str, result: StepResult, store: ArtifactStore) -> None:
    """Say in the run log and as a Prefect artifact what the step produced, and where."""
    outputs = ", ".join(f"{k}={v[:12]}" for k, v in result.digests().items())
    origin = (f"cached (from run {result.flow_run_id})" if result.cached
              else f"computed by run {result.flow_run_id}")
    get_run_logger().info("step %s: %s, mlflow run %s: %s", name, origin,
                          result.mlflow_run_id, outputs)
    rows = [{"output": key, "digest": m.digest, "kind": m.kind, "size": m.size,
             "uri": store.uri(m.digest)} for key, m in result.outputs.items()]
    create_table_artifact(rows, key=f"{name.replace('_', '-')}-outputs",
                          description=f"step {name}: {origin}; MLflow run "
                          f"{result.mlflow_run_id}")


@contextmanager
def flow_run_context(name: str, settings: RunSettings,
                     params: Mapping[str, Any]) -> Iterator[FlowRun]:
    """Open the store and the flow's parent MLflow run around the flow's body."""
    store = open_store(settings.store)
    tracker = open_tracker(settings.tracking_uri, settings.tracking)
    run_id = flow_run.get_id()
    # Judging staleness loads each step named in the store's manifests (their code, torch
    # included), so only when asked.
    stale = frozenset(s.digest for s in find_stale(store)) if settings.recompute_stale \
        else frozenset()
    with tracker.flow_run(name, params, run_id) as parent, \
            tempfile.TemporaryDirectory(prefix=f"tailwise-{name}-") as scratch, \
            ExitStack() as resources:
        run = FlowRun(flow_run.get_flow_name() or name, store, tracker, parent.run_id, run_id,
                      settings, Path(scratch), resources, stale=stale,
                      lineage=Emitter.from_environment())
        emit_flow_state(run, "START")
        try:
            yield run
            if run.outputs and parent.run_id is not None:
                page = Path(scratch) / "lineage.html"
                graph = upstream_of_all(store, list(dict.fromkeys(run.outputs)))
                page.write_text(to_html(annotate_metrics(store, graph)))
                parent.log_file(page)
        except BaseException:
            emit_flow_state(run, "FAIL")
            raise
        emit_flow_state(run, "COMPLETE")
