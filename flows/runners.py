"""Three places a step can run, one contract: (step, params, input digests) -> StepResult.

- inline: a call in the flow's process;
- process: `python -m steps.<name> --request ...`, the container command, as a subprocess;
- deployment: the step's own Prefect deployment (`step/<name>`) on a work pool, which is
  how a step gets its own image and GPU on Docker or Kubernetes pools.

The outputs are content-addressed, so all three give the same digests. A remote run
reports back through the store: its cache entry names its outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from steps.core.errors import TailwiseError
from steps.core.main import StepRequest
from steps.core.step import Step, StepResult, cache_key, run_step
from steps.core.store import ArtifactStore
from steps.core.tracking import NullTracker

STEP_FLOW = "step"  # deployments are named step/<step name>
DEPLOYMENT_TIMEOUT_S = float(os.environ.get("TAILWISE_DEPLOYMENT_TIMEOUT_S", 6 * 3600))


class StepRunFailed(TailwiseError):
    """A step's process or deployment run did not complete."""


@dataclass(frozen=True)
class Dispatch:
    """What a runner needs to know about the flow run it works for."""

    store: ArtifactStore
    tracker: NullTracker
    parent_run_id: str | None
    flow_run_id: str | None
    flow_name: str | None = None

    def request(self, params: BaseModel, inputs: dict[str, str]) -> StepRequest:
        # The flow already looked in the cache; the step must compute.
        return StepRequest(params=params.model_dump(mode="json"), inputs=inputs,
                           store=self.store.url, tracking=self.tracker.tracking_uri is not None,
                           tracking_uri=self.tracker.tracking_uri,
                           parent_run_id=self.parent_run_id,
                           flow_run_id=self.flow_run_id, flow_name=self.flow_name,
                           use_cache=False)


Runner = Callable[[Dispatch, Step, BaseModel, dict[str, str]], StepResult]


def run_inline(dispatch: Dispatch, step: Step, params: BaseModel,
               inputs: dict[str, str]) -> StepResult:
    return run_step(step, params, inputs, store=dispatch.store, tracker=dispatch.tracker,
                    parent_run_id=dispatch.parent_run_id, flow_run_id=dispatch.flow_run_id,
                    flow_name=dispatch.flow_name, use_cache=False)


def run_process(dispatch: Dispatch, step: Step, params: BaseModel,
                inputs: dict[str, str]) -> StepResult:
    with tempfile.TemporaryDirectory(prefix=f"tailwise-{step.name}-") as scratch:
        request, result = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request.write_text(dispatch.request(params, inputs).model_dump_json())
        done = subprocess.run([sys.executable, "-m", f"steps.{step.name}", "--request",
                               str(request), "--result", str(result)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StepRunFailed(f"step {step.name} process exited with {done.returncode}: "
                                f"{last_line(done.stderr)}")
        outputs = json.loads(result.read_text())["outputs"]
    return finished(dispatch, step, params, inputs,
                    {name: out["digest"] for name, out in outputs.items()})


def run_on_deployment(dispatch: Dispatch, step: Step, params: BaseModel,
                      inputs: dict[str, str]) -> StepResult:
    from prefect.deployments import run_deployment

    name = f"{STEP_FLOW}/{step.name}"
    flow_run = run_deployment(name, parameters={
        "step": step.name, "request": dispatch.request(params, inputs).model_dump(mode="json")},
        timeout=DEPLOYMENT_TIMEOUT_S, as_subflow=True)
    if not flow_run.state or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise StepRunFailed(f"deployment {name} run {flow_run.id} ended {state}: "
                            f"{flow_run.state.message if flow_run.state else ''}")
    entry = dispatch.store.cache_get(cache_key(step, params, inputs))
    if entry is None:
        raise StepRunFailed(f"deployment {name} run {flow_run.id} completed but its outputs "
                            f"are not in the store {dispatch.store.url}: do the worker and the "
                            "flow use the same TAILWISE_STORE?")
    return finished(dispatch, step, params, inputs, entry["outputs"],
                    entry.get("mlflow_run_id"))


def finished(dispatch: Dispatch, step: Step, params: BaseModel, inputs: dict[str, str],
             outputs: dict[str, str], mlflow_run_id: str | None = None) -> StepResult:
    manifests = {name: dispatch.store.stat(digest) for name, digest in outputs.items()}
    first = next(iter(manifests.values()), None)
    made = first.produced_by if first else None
    return StepResult(step.name, cache_key(step, params, inputs), manifests, cached=False,
                      mlflow_run_id=mlflow_run_id or (made.mlflow_run_id if made else None),
                      flow_run_id=dispatch.flow_run_id)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


RUNNERS: dict[str, Runner] = {"inline": run_inline, "process": run_process,
                              "deployment": run_on_deployment}
