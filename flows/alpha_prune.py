"""AlphaPruning end to end: spectral -> allocate -> prune -> evaluate, beside a uniform baseline.

Both allocations prune the same model with the same method, calibration text and
global sparsity; the dense model is evaluated too. The run's result is the
comparison table (also a Prefect table artifact).
"""

from __future__ import annotations

from typing import Literal

import pyarrow.parquet as pq
from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.common import FlowRun, RunSettings, flow_run_context, model_digest


class PruneSetup(BaseModel):
    """What every pruning flow needs: the model, its alpha fit, calibration and evaluation."""

    model: str = Field("tiny-llama", description="tiny-gpt2, tiny-llama, smollm2, or a model "
                       "dir / safetensors path / artifact digest.")
    estimator: str = Field("alpha_peak", description="Alpha fit used for the allocation.")
    nsamples: int = Field(8, ge=1, description="Calibration sequences.")
    seqlen: int = Field(128, ge=8, description="Calibration and evaluation window (tokens).")
    text_chars: int | None = Field(200_000, gt=0, description="Characters of KJV text kept "
                                   "for calibration and evaluation (None: all).")
    eval_windows: int | None = Field(16, ge=1, description="Evaluation windows (None: all).")


class AlphaPruneParams(PruneSetup):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float = Field(0.7, ge=0, lt=1, description="Global target sparsity.")
    epsilon: float = Field(0.3, ge=0, lt=1, description="AlphaPruning spread.")


@flow(name="alpha_prune", log_prints=True)
def alpha_prune(params: AlphaPruneParams = AlphaPruneParams(),
                settings: RunSettings = RunSettings()) -> list[dict]:
    """Prune by AlphaPruning and by uniform allocation; evaluate both and the dense model."""
    with flow_run_context("alpha_prune", settings, params.model_dump()) as run:
        model = model_digest(run, params.model)
        text = {split: run.step("build_text", {"split": split, "max_chars": params.text_chars},
                                label=f"text-{split}").digests()["text"]
                for split in ("train", "test")}
        metrics = run.step("spectral", {"estimator": params.estimator, "plots": False},
                           {"model": model}).digests()["metrics"]
        allocations = {
            "uniform": {"policy": "uniform", "options": {"sparsity": params.sparsity}},
            "alphapruning": {"policy": "alphapruning", "options": {
                "sparsity": params.sparsity, "epsilon": params.epsilon}},
        }
        evaluate = {"seqlen": params.seqlen, "max_windows": params.eval_windows}
        evaluations = {"dense": run.step("evaluate", evaluate | {"name": "dense"},
                                         {"model": model, "text": text["test"]},
                                         label="evaluate-dense")}
        for name, allocation in allocations.items():
            decisions = run.step("allocate", allocation, {"metrics": metrics},
                                 label=f"allocate-{name}").digests()["decisions"]
            pruned = run.step("prune", {"method": params.method, "nsamples": params.nsamples,
                                        "seqlen": params.seqlen},
                              {"model": model, "allocation": decisions,
                               "calibration": text["train"]}, label=f"prune-{name}")
            evaluations[name] = run.step("evaluate", evaluate | {"name": name},
                                         {"model": pruned.digests()["model"],
                                          "text": text["test"]}, label=f"evaluate-{name}")
        rows = [comparison_row(run, name, result.digests()["evaluation"])
                for name, result in evaluations.items()]
    create_table_artifact(rows, key="alpha-prune-comparison",
                          description=f"{params.method} at {params.sparsity:.0%} on "
                          f"{params.model}: perplexity by allocation")
    return rows


def comparison_row(run: FlowRun, allocation: str, evaluation: str) -> dict:
    """The evaluation artifact's row, labelled by allocation, with its digest."""
    path = run.store.get(evaluation, run.scratch / f"{evaluation}.parquet")
    row = pq.read_table(path).to_pylist()[0]
    return {"allocation": allocation, "perplexity": row["perplexity"],
            "sparsity": row["sparsity"], "evaluation": evaluation}
