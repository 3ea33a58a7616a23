"""The deployments the local stack registers on its work pool (`prefect.serve` takes them too).

One entry per flow. Entry points are module paths (`flows.demo.demo`), so a worker
imports the flow from the installed package whatever its working directory. Add a
flow with one line; give it `cron=` (with `timezone=`) to run it on a schedule, e.g.

    spectral_audit.to_deployment(name="nightly", cron="0 3 * * *", timezone="UTC", **common)
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.demo import demo


def deployments() -> list[RunnerDeployment]:
    """The deployments to register (flow name / deployment name is what the UI shows)."""
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["tailwise"]}
    return [
        demo.to_deployment(name="demo", description="build_model -> spectral on a tiny model.",
                           **common),
    ]
