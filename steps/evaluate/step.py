"""The evaluate step: model (+ text or labelled data) -> one row of metrics (perplexity or
accuracy, sparsity, size), and zero-shot accuracy per task (lm-eval) when tasks are named."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from steps.core.devices import resolve_device
from steps.core.factory import load_model
from steps.core.step import Output, Step, StepContext
from steps.evaluate.metrics import size_on_disk
from steps.evaluate.rows import evaluate_model, model_tokenizer, write_rows
from steps.evaluate.zeroshot import load_tasks, run_tasks, write_zero_shot_rows


class EvaluateParams(BaseModel):
    name: str = Field("model", description="Label of this model in comparison tables.")
    seqlen: int | None = Field(None, ge=8, description="Perplexity window (default: the "
                               "model's context length, at most 2048).")
    max_windows: int | None = Field(None, ge=1, description="Evaluate only the first windows.")
    device: str = Field("auto", description="auto, cpu or cuda.")
    max_examples: int | None = Field(None, ge=1, description="data: evaluate a seeded, "
                                     "stratified subset of the test split.")
    max_length: int = Field(128, ge=4, description="data: tokens per example.")
    split_seed: int = Field(0, ge=0, description="data: seed of the split (files without "
                            "one) and of the subset.")
    tasks: list[str] = Field(default_factory=list, description="Zero-shot tasks (lm-eval): "
                             "kjv_next_verse (shipped, offline), boolq, rte, hellaswag, "
                             "winogrande, arc_easy, arc_challenge, openbookqa, or a task of the "
                             "'tasks' input dir.")
    limit: int | None = Field(None, ge=1, description="Zero-shot: only the first examples of "
                              "each task.")


def evaluate_step(ctx: StepContext, params: EvaluateParams, inputs: dict[str, Path]) -> dict:
    if "data" in inputs:
        return classifier_evaluation(ctx, params, inputs)
    # Tasks are looked up before the model loads: a missing one fails at once.
    tasks = load_tasks(params.tasks, inputs.get("tasks")) if params.tasks else {}
    model = load_model(inputs["model"])  # once, for perplexity and every task
    needs_tokenizer = "text" in inputs or bool(tasks)
    tokenizer = model_tokenizer(inputs["model"]) if needs_tokenizer else None
    row = evaluate_model(model, tokenizer, name=params.name,
                         perplexity_text=inputs.get("text"), seqlen=params.seqlen,
                         max_windows=params.max_windows, device=params.device,
                         progress=ctx.progress)
    row["size_bytes"] = size_on_disk(inputs["model"])
    row["perplexity_text"] = ctx.input_digests.get("text")  # the digest, not a scratch path
    ctx.log_metrics({k: row[k] for k in ("perplexity", "sparsity", "params", "size_bytes")
                     if row.get(k) is not None})
    path = write_rows([row], ctx.workdir / "evaluation.parquet")
    outputs = {"evaluation": Output(path, "evaluation", "application/vnd.apache.parquet")}
    if tasks:
        model.to(resolve_device(params.device))
        outputs["zeroshot"] = zero_shot_evaluation(ctx, params, run_tasks(
            model, tokenizer, tasks, limit=params.limit))
    return outputs


def zero_shot_evaluation(ctx: StepContext, params: EvaluateParams,
                         rows: list[dict]) -> Output:
    """lm-eval's accuracy per task: one Parquet row each, and MLflow metrics."""
    for row in rows:
        row["model"] = params.name
        ctx.log_metrics({f"zeroshot_{row['task']}_{metric}": row[metric]
                         for metric in ("acc", "acc_norm") if row[metric] is not None})
    path = write_zero_shot_rows(rows, ctx.workdir / "zeroshot.parquet")
    return Output(path, "zeroshot", "application/vnd.apache.parquet")


def classifier_evaluation(ctx: StepContext, params: EvaluateParams,
                          inputs: dict[str, Path]) -> dict:
    """A fine-tuned text classifier: accuracy and loss on the data's test split."""
    from steps.evaluate.classify import classifier_metrics

    metrics = classifier_metrics(inputs["model"], inputs["data"], max_examples=params.max_examples,
                                 max_length=params.max_length, seed=params.split_seed,
                                 device=str(resolve_device(params.device)))
    ctx.log_metrics(metrics)
    row = metrics | {"model": params.name, "data": ctx.input_digests.get("data"),
                     "size_bytes": size_on_disk(inputs["model"])}
    path = ctx.workdir / "evaluation.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    return {"evaluation": Output(path, "evaluation", "application/vnd.apache.parquet")}


STEP = Step(name="evaluate", version="1", params=EvaluateParams, inputs=("model",),
            fn=evaluate_step, optional_inputs=("text", "data", "tasks"))
