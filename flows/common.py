"""What every flow shares: where artifacts and tracking go, and how a step is run as a task.

Flows only compose: they name steps, params and input digests. The numerical work
happens in `steps/`, imported by name when a task runs, so this module never
imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from steps.core.errors import ArtifactNotFound, ParamsError
from steps.core.registry import load_step
from steps.core.step import StepResult, run_step
from steps.core.store import ArtifactStore, open_store
from steps.core.tracking import NullTracker, open_tracker


class RunSettings(BaseModel):
    """Where a flow keeps its artifacts and records its runs."""

    store: str | None = Field(None, description="Artifact store URL: a directory or "
                              "s3://bucket/prefix (default $TAILWISE_STORE or .tailwise/store).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default "
                                     "$MLFLOW_TRACKING_URI or .tailwise/mlflow.db).")
    tracking: bool = Field(True, description="Record runs in MLflow.")
    use_cache: bool = Field(True, description="Reuse outputs of steps already computed.")


@dataclass
class FlowRun:
    """A running flow: its store, its tracker and its parent MLflow run."""

    name: str
    store: ArtifactStore
    tracker: NullTracker
    parent_run_id: str | None
    flow_run_id: str | None
    use_cache: bool

    def step(self, name: str, params: Mapping[str, Any] | None = None,
             inputs: Mapping[str, str] | None = None) -> StepResult:
        """Run step `name` as a Prefect task (or reuse its cached outputs)."""
        return step_task.with_options(name=name)(self, name, dict(params or {}),
                                                  dict(inputs or {}))


def is_transient(task, task_run, state) -> bool:
    """Retry what may pass (a server away), not what cannot (bad params, missing input)."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, ParamsError | ArtifactNotFound)


# Prefect's own task cache is off: steps have their content-addressed cache in the store.
@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient,
      cache_policy=NO_CACHE)
def step_task(run: FlowRun, name: str, params: dict, inputs: dict) -> StepResult:
    result = run_step(load_step(name), params, inputs, store=run.store, tracker=run.tracker,
                      parent_run_id=run.parent_run_id, flow_run_id=run.flow_run_id,
                      use_cache=run.use_cache)
    logger = get_run_logger()
    outputs = ", ".join(f"{k}={v[:12]}" for k, v in result.digests().items())
    if result.cached:
        logger.info("step %s: cached (from run %s; mlflow run %s): %s", name,
                    result.flow_run_id, result.mlflow_run_id, outputs)
    else:
        logger.info("step %s: computed (mlflow run %s): %s", name, result.mlflow_run_id, outputs)
    return result


@contextmanager
def flow_run_context(name: str, settings: RunSettings,
                     params: Mapping[str, Any]) -> Iterator[FlowRun]:
    """Open the store and the flow's parent MLflow run around the flow's body."""
    store = open_store(settings.store)
    tracker = open_tracker(settings.tracking_uri, settings.tracking)
    run_id = flow_run.get_id()
    with tracker.flow_run(name, params, run_id) as parent:
        yield FlowRun(name, store, tracker, parent.run_id, run_id, settings.use_cache)
