"""Audit a list of models (e.g. every checkpoint of a training run) and flag moving layers.

Each model's spectrum is measured (all at once on a parallel `settings.executor`);
consecutive models are compared layer by layer, and the first is compared with the last
model of the previous audit of the same name (a store ref `audit/<name>`), so a nightly
schedule reports what moved since last night. With `randomize`, each spectrum also has
the correlation-trap columns and the drift tables flag layers with new traps.
"""

from __future__ import annotations

from itertools import pairwise

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from flows.common import RunSettings, flow_run_context


class AuditParams(BaseModel):
    models: list[str] = Field(..., min_length=1, description="Model dirs, safetensors files "
                              "or artifact digests, oldest first.")
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Audit name: the next audit of this name compares with it.")
    estimator: str = Field("ks", description="Power-law fit: ks, alpha_peak, hill.")
    threshold: float = Field(0.5, gt=0, description="Flag layers whose alpha moved more.")
    randomize: bool = Field(False, description="Also measure correlation traps (shuffled "
                            "ESDs) and flag layers with new ones.")


@flow(name="spectral_audit", log_prints=True)
def spectral_audit(params: AuditParams, settings: RunSettings = RunSettings()) -> dict:
    """spectral per model -> drift between consecutive ones; returns the drift digests."""
    with flow_run_context("spectral_audit", settings, params.model_dump()) as run:
        ref = f"audit/{params.name}"
        previous = run.store.get_ref(ref)
        # Every model's spectrum at once (settings.executor), then every comparison at once.
        spectral = {"estimator": params.estimator, "plots": False,
                    "randomize": params.randomize}
        spectra = [run.submit("spectral", spectral,
                              {"model": run.source(model, "model")}, label=f"spectral-{index}")
                   for index, model in enumerate(params.models)]
        metrics = [future.result().digests()["metrics"] for future in spectra]
        pairs = ([previous] if previous else []) + metrics
        comparisons = [run.submit("drift", {"threshold": params.threshold},
                                  {"previous": before, "current": after}, label=f"drift-{index}")
                       for index, (before, after) in enumerate(pairwise(pairs))]
        drifts = [future.result().digests()["drift"] for future in comparisons]
        run.store.set_ref(ref, metrics[-1])
        get_run_logger().info("audit %s: %d models, %d comparisons (previous audit: %s)",
                              params.name, len(metrics), len(drifts), previous or "none")
    return {"metrics": metrics, "drifts": drifts, "previous": previous}
