"""The deployments the local stack registers on its work pool (`prefect.serve` takes them too).

One entry per flow of flows/registry.py (its description, its deployment name). Entry
points are module paths (`flows.demo.demo`), so a worker imports the flow from the
installed package whatever its working directory. A deployment with a schedule, as
`spectral_audit`'s nightly one below, gets its options in SCHEDULED.
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.registry import FLOWS
from flows.spectral_audit import AuditParams
from flows.step_flow import step_deployments

SCHEDULED: dict[str, dict[str, Any]] = {
    "spectral_audit": {
        "schedule": Cron("0 3 * * *", timezone="UTC"), "paused": True,
        "description": "Nightly spectral audit; set `models` to your checkpoints.",
        "parameters": {"params": AuditParams(models=["tiny-model"]).model_dump()}},
}


def deployments() -> list[RunnerDeployment]:
    """The deployments to register (flow name / deployment name is what the UI shows)."""
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["tailwise"]}
    return [
        *(entry.flow.to_deployment(name=entry.deployment, **common | {
            "description": entry.description} | SCHEDULED.get(name, {}))
          for name, entry in FLOWS.items()),
        *step_deployments(entrypoint_type=EntrypointType.MODULE_PATH),
    ]
