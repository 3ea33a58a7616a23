"""What every flow shares: where artifacts and tracking go, and how a step is run as a task.

Flows only compose: they name steps, params and input digests. The numerical work
happens in `steps/`, imported by name when a task runs, so this module never
imports torch. A flow is a few lines:

    @flow
    def my_flow(params: MyParams = MyParams(), settings: RunSettings = RunSettings()):
        with flow_run_context("my_flow", settings, params.model_dump()) as run:
            model = run.step("build_model", {"name": params.model})
            run.step("spectral", {}, {"model": model.digests()["model"]})
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.assets import materialize
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows.runners import RUNNERS, Dispatch
from steps.core.errors import ArtifactNotFound, ParamsError
from steps.core.jobs import retry_policy
from steps.core.registry import load_step
from steps.core.step import StepResult, cached_result
from steps.core.store import ArtifactStore, open_store
from steps.core.tracking import NullTracker, open_tracker

RunnerName = Literal["inline", "process", "deployment"]


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


@dataclass
class FlowRun:
    """A running flow: its store, tracker, parent MLflow run and how steps are run."""

    name: str
    store: ArtifactStore
    tracker: NullTracker
    parent_run_id: str | None
    flow_run_id: str | None
    settings: RunSettings
    scratch: Path

    def step(self, name: str, params: Mapping[str, Any] | None = None,
             inputs: Mapping[str, str] | None = None, label: str | None = None) -> StepResult:
        """Run step `name` as a Prefect task (or reuse its cached outputs)."""
        retries, delays = retry_policy(name)
        task_run = step_task.with_options(name=label or name, retries=retries,
                                          retry_delay_seconds=delays)
        return task_run(self, name, dict(params or {}), dict(inputs or {}))

    def source(self, ref: str, kind: str) -> str:
        """The digest of an input given as a local path (stored first) or an artifact ref."""
        path = Path(ref)
        return self.store.put(path, kind).digest if path.exists() else self.store.resolve(ref)

    def dispatch(self) -> Dispatch:
        return Dispatch(self.store, self.tracker, self.parent_run_id, self.flow_run_id)


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
    if not result:
        result = RUNNERS[run.settings.runner](run.dispatch(), step, valid, digests)
        announce_assets(name, result, digests, run.store)
    report(name, result, run.store)
    return result


def announce_assets(name: str, result: StepResult, inputs: dict[str, str],
                    store: ArtifactStore) -> None:
    """Prefect asset materialisation events, so lineage also shows in Prefect's event feed."""
    outputs = [store.uri(digest) for digest in result.digests().values()]
    deps = [store.uri(digest) for digest in inputs.values()]
    materialize(*outputs, asset_deps=deps, by="tailwise", name=f"{name}-assets",
                cache_policy=NO_CACHE)(lambda: None)()


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
    with tracker.flow_run(name, params, run_id) as parent, \
            tempfile.TemporaryDirectory(prefix=f"tailwise-{name}-") as scratch:
        yield FlowRun(name, store, tracker, parent.run_id, run_id, settings, Path(scratch))
