"""Each step as its own Prefect flow run: deployment `step/<name>` on a work pool.

On Docker or Kubernetes pools, the deployment's job variables (from
containers/steps.yaml) give the step its own image and resources, GPUs included.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.runners import STEP_FLOW
from steps.core.main import StepRequest, execute
from steps.core.registry import STEP_NAMES, load_step


@flow(name=STEP_FLOW)
def step_flow(step: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run one step from a request (the same request the container command reads)."""
    return execute(load_step(step), StepRequest.model_validate(request)).to_json()


def step_deployments(names: tuple[str, ...] = STEP_NAMES, **options: Any) -> list:
    """One deployment per step, for `prefect.serve` (process) or a work pool."""
    return [step_flow.to_deployment(name=name, **{"tags": ["tailwise-step"], **options})
            for name in names]


if __name__ == "__main__":
    from prefect import serve

    serve(*step_deployments())
