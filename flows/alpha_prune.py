"""AlphaPruning end to end: spectral -> allocate -> prune -> evaluate, beside a uniform baseline.

Both allocations prune the same model with the same method, calibration text and
global sparsity; the dense model is evaluated too. The two branches are independent, so
on a parallel `settings.executor` (threads, a Dask cluster) their steps run at once. The
run's result is the comparison table (also a Prefect table artifact).
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
    estimator: str = Field("alpha_peak", description="Alpha fit of the spectral table's "
                           "`alpha` column and report; AlphaPruning always allocates from "
                           "alpha_peak, its paper's fit (every fit is in the table).")
    nsamples: int = Field(8, ge=1, description="Calibration sequences.")
    seqlen: int = Field(128, ge=8, description="Calibration and evaluation window (tokens).")
    text_chars: int | None = Field(200_000, gt=0, description="Characters of KJV text kept "
                                   "for calibration and evaluation (None: all).")
    eval_windows: int | None = Field(16, ge=1, description="Evaluation windows (None: all).")
    tasks: list[str] = Field(default_factory=list, description="Zero-shot tasks (lm-eval), "
                             "e.g. kjv_next_verse (shipped, offline), boolq, arc_easy, ...")
    task_dir: str | None = Field(None, description="Directory of lm-eval task YAML + JSONL "
                                 "files, or its artifact digest.")
    limit: int | None = Field(None, ge=1, description="Zero-shot: first examples per task.")

    def evaluate_params(self) -> dict:
        """The evaluate step's params shared by every model the flow compares."""
        return {"seqlen": self.seqlen, "max_windows": self.eval_windows, "tasks": self.tasks,
                "limit": self.limit}

    def evaluate_inputs(self, run: FlowRun, model: str, text: str) -> dict:
        """The evaluate step's inputs: the model, the test text and the task dir if any."""
        inputs = {"model": model, "text": text}
        if self.task_dir is not None:
            inputs["tasks"] = run.source(self.task_dir, "zeroshot-tasks")
        return inputs


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
        texts = {split: run.submit("build_text", {"split": split, "max_chars": params.text_chars},
                                   label=f"text-{split}") for split in ("train", "test")}
        spectral = run.submit("spectral", {"estimator": params.estimator, "plots": False},
                              {"model": model})
        text = {split: future.result().digests()["text"] for split, future in texts.items()}
        evaluate = params.evaluate_params()
        evaluations = {"dense": run.submit("evaluate", evaluate | {"name": "dense"},
                                           params.evaluate_inputs(run, model, text["test"]),
                                           label="evaluate-dense")}
        metrics = spectral.result().digests()["metrics"]
        decisions = {name: run.submit("allocate", allocation, {"metrics": metrics},
                                      label=f"allocate-{name}")
                     for name, allocation in allocations(params).items()}
        pruned = {name: run.submit("prune", {"method": params.method,
                                             "nsamples": params.nsamples,
                                             "seqlen": params.seqlen},
                                   {"model": model,
                                    "allocation": future.result().digests()["decisions"],
                                    "calibration": text["train"]}, label=f"prune-{name}")
                  for name, future in decisions.items()}
        for name, future in pruned.items():
            evaluations[name] = run.submit("evaluate", evaluate | {"name": name},
                                           params.evaluate_inputs(
                                               run, future.result().digests()["model"],
                                               text["test"]), label=f"evaluate-{name}")
        rows = [comparison_row(run, name, future.result().digests())
                for name, future in evaluations.items()]
    create_table_artifact(rows, key="alpha-prune-comparison",
                          description=f"{params.method} at {params.sparsity:.0%} on "
                          f"{params.model}: perplexity (and zero-shot accuracy) by allocation")
    return rows


def allocations(params: AlphaPruneParams) -> dict[str, dict]:
    """The allocate step's params for each allocation compared."""
    return {
        "uniform": {"policy": "uniform", "options": {"sparsity": params.sparsity}},
        "alphapruning": {"policy": "alphapruning",
                         "options": {"sparsity": params.sparsity, "epsilon": params.epsilon}},
    }


def comparison_row(run: FlowRun, allocation: str, outputs: dict[str, str]) -> dict:
    """The evaluation's row, labelled by allocation, with its digest; then each zero-shot
    task's accuracy (`<task> acc`, `<task> acc_norm`) when tasks were evaluated."""
    evaluation = outputs["evaluation"]
    row = read_table(run, evaluation)[0]
    compared = {"allocation": allocation, "perplexity": row["perplexity"],
                "sparsity": row["sparsity"]}
    for task in read_table(run, outputs["zeroshot"]) if "zeroshot" in outputs else []:
        compared |= {f"{task['task']} {metric}": task[metric] for metric in ("acc", "acc_norm")}
    return compared | {"evaluation": evaluation}


def read_table(run: FlowRun, digest: str) -> list[dict]:
    return pq.read_table(run.store.get(digest, run.scratch / f"{digest}.parquet")).to_pylist()
