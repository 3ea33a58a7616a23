"""A sparsity x method sweep: prune one model by one allocation policy, evaluate every cell.

spectral (and, for OWL, the calibration pass) runs once; there is one allocation per
sparsity and one prune + evaluate per (sparsity, method) cell. The cells are independent,
so they run at once on a parallel `settings.executor` (threads, a Dask cluster). The dense
model is evaluated too. The run's result is the comparison table (also a Prefect table
artifact), one row per cell plus the dense baseline.
"""

from __future__ import annotations

from itertools import product
from typing import Annotated, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.alpha_prune import PruneSetup, comparison_row
from flows.common import FlowRun, RunSettings, StepFuture, flow_run_context, model_digest

Method = Literal["magnitude", "wanda", "sparsegpt"]
Sparsity = Annotated[float, Field(ge=0, lt=1)]


class PruneSweepParams(PruneSetup):
    sparsities: list[Sparsity] = Field([0.5, 0.7], min_length=1,
                                    description="Global target sparsities, each in [0, 1).")
    methods: list[Method] = Field(["magnitude", "wanda"], min_length=1,
                                  description="Pruning methods.")
    policy: Literal["uniform", "alphapruning", "owl"] = Field(
        "alphapruning", description="How the global sparsity is spread over the layers.")
    epsilon: float = Field(0.3, ge=0, lt=1, description="alphapruning: spread.")
    lam: float = Field(0.08, ge=0, lt=1, description="owl: lambda (sparsities span 2 lambda).")

    def policy_options(self, sparsity: float) -> dict:
        extra = {"alphapruning": {"epsilon": self.epsilon}, "owl": {"lam": self.lam}}
        return {"sparsity": sparsity, **extra.get(self.policy, {})}


@flow(name="prune_sweep", log_prints=True)
def prune_sweep(params: PruneSweepParams = PruneSweepParams(),
                settings: RunSettings = RunSettings()) -> list[dict]:
    """Prune at every (sparsity, method) by one policy; evaluate each and the dense model."""
    with flow_run_context("prune_sweep", settings, params.model_dump()) as run:
        model = model_digest(run, params.model)
        texts = {split: run.submit("build_text", {"split": split,
                                                  "max_chars": params.text_chars},
                                   label=f"text-{split}") for split in ("train", "test")}
        spectral = run.submit("spectral", {"estimator": params.estimator, "plots": False},
                              {"model": model})
        text = {split: future.result().digests()["text"] for split, future in texts.items()}
        evaluate = params.evaluate_params()
        dense = run.submit("evaluate", evaluate | {"name": "dense"},
                           params.evaluate_inputs(run, model, text["test"]),
                           label="evaluate-dense")
        decisions = allocations(run, params, spectral.result().digests()["metrics"], model,
                                text["train"])
        cells = list(product(params.sparsities, params.methods))
        pruned = {cell: run.submit("prune", {"method": cell[1], "nsamples": params.nsamples,
                                             "seqlen": params.seqlen},
                                   {"model": model, "allocation": decisions[cell[0]],
                                    "calibration": text["train"]}, label=cell_label("prune", cell))
                  for cell in cells}
        evaluations = {cell: run.submit("evaluate", evaluate | {"name": cell_label("", cell)},
                                        params.evaluate_inputs(
                                            run, future.result().digests()["model"],
                                            text["test"]),
                                        label=cell_label("evaluate", cell))
                       for cell, future in pruned.items()}
        rows = [row(run, params.policy, None, "dense", dense)]
        rows += [row(run, params.policy, *cell, future) for cell, future in evaluations.items()]
    create_table_artifact(rows, key="prune-sweep-comparison",
                          description=f"{params.policy} allocation on {params.model}: "
                          f"perplexity (and zero-shot accuracy) by sparsity and method")
    return rows


def allocations(run: FlowRun, params: PruneSweepParams, metrics: str, model: str,
                calibration: str) -> dict[float, str]:
    """One decisions table per target sparsity (OWL measures its outliers on the model)."""
    inputs = {"metrics": metrics}
    extra = {}
    if params.policy == "owl":
        inputs |= {"model": model, "calibration": calibration}
        extra = {"calibration_samples": params.nsamples, "calibration_seqlen": params.seqlen}
    futures = {sparsity: run.submit("allocate", {"policy": params.policy, **extra,
                                                 "options": params.policy_options(sparsity)},
                                    inputs, label=f"allocate-{sparsity:g}")
               for sparsity in dict.fromkeys(params.sparsities)}
    return {sparsity: future.result().digests()["decisions"]
            for sparsity, future in futures.items()}


def cell_label(prefix: str, cell: tuple[float, str]) -> str:
    sparsity, method = cell
    return "-".join(filter(None, (prefix, method, f"{sparsity:g}")))


def row(run: FlowRun, policy: str, target: float | None, method: str,
        evaluation: StepFuture) -> dict:
    """One line of the comparison: the cell, then its evaluation (perplexity, sparsity,
    zero-shot accuracy)."""
    measured = comparison_row(run, policy, evaluation.result().digests())
    return {"method": method, "target_sparsity": target, **measured}
