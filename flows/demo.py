"""The demo: build a tiny model, then measure every layer's weight spectrum."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from flows.common import RunSettings, flow_run_context


class DemoParams(BaseModel):
    model: str = Field("tiny-gpt2", description="Model to build (see `tailwise model --help`).")
    seed: int = Field(0, ge=0, description="Seed of the tiny random model.")
    estimator: str = Field("ks", description="Power-law fit: ks, alpha_peak or hill.")


@flow(name="demo", log_prints=True)
def demo(params: DemoParams = DemoParams(), settings: RunSettings = RunSettings()) -> dict:
    """build_model -> spectral; returns the step results by step name (`tailwise run demo`
    prints their digests, the MLflow run and the lineage command)."""
    with flow_run_context("demo", settings, params.model_dump()) as run:
        model = run.step("build_model", {"name": params.model, "seed": params.seed})
        spectral = run.step("spectral", {"estimator": params.estimator},
                            {"model": model.digests()["model"]})
    return {"build_model": model, "spectral": spectral}
