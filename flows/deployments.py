"""The deployments the local stack registers on its work pool (`prefect.serve` takes them too).

One entry per flow. Entry points are module paths (`flows.demo.demo`), so a worker
imports the flow from the installed package whatever its working directory. Add a
flow with one line; give it a `schedule=` to run it on one, as `spectral_audit` below.
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.alpha_prune import alpha_prune
from flows.demo import demo
from flows.finetune import alphalora_finetune, tempbalance_finetune
from flows.model_zoo import model_zoo
from flows.prunability import prunability
from flows.prune_sweep import prune_sweep
from flows.spectral_audit import AuditParams, spectral_audit
from flows.step_flow import step_deployments


def deployments() -> list[RunnerDeployment]:
    """The deployments to register (flow name / deployment name is what the UI shows)."""
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["tailwise"]}
    return [
        demo.to_deployment(name="demo", description="build_model -> spectral on a tiny model.",
                           **common),
        alpha_prune.to_deployment(
            name="alpha_prune", description="spectral -> allocate -> prune -> evaluate, "
            "AlphaPruning beside the uniform baseline.", **common),
        prune_sweep.to_deployment(
            name="prune_sweep", description="prune + evaluate at every sparsity x method by "
            "one allocation policy, the cells in parallel (settings.executor).", **common),
        tempbalance_finetune.to_deployment(
            name="tempbalance_finetune", description="spectral -> allocate -> finetune with "
            "TempBalance, beside the plain fine-tune.", **common),
        alphalora_finetune.to_deployment(
            name="alphalora_finetune", description="spectral -> allocate (experts) -> "
            "finetune with AlphaLoRA experts, beside the same budget spread uniformly.",
            **common),
        model_zoo.to_deployment(
            name="model_zoo", description="Train a grid of small models, measure their loss "
            "landscapes, fit the MD tree and report its transfer accuracy.", **common),
        prunability.to_deployment(
            name="prunability", description="Train at each value of a temperature-like knob, "
            "magnitude-prune to each density, retrain seeds on the mask; LMC and CKA place "
            "every cell in regime I / II-A / II-B: advice, picks and the phase map.", **common),
        spectral_audit.to_deployment(
            name="nightly", schedule=Cron("0 3 * * *", timezone="UTC"),
            description="Nightly spectral audit; set `models` to your checkpoints.",
            parameters={"params": AuditParams(models=["tiny-model"]).model_dump()},
            paused=True, **common),
        *step_deployments(entrypoint_type=EntrypointType.MODULE_PATH),
    ]
