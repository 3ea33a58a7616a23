"""The evaluate step: model (+ text) -> one row of metrics (perplexity, sparsity, size)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from steps.core.step import Output, Step, StepContext
from steps.evaluate.rows import evaluate_model_dir, write_rows


class EvaluateParams(BaseModel):
    name: str = Field("model", description="Label of this model in comparison tables.")
    seqlen: int | None = Field(None, ge=8, description="Perplexity window (default: the "
                               "model's context length).")
    max_windows: int | None = Field(None, ge=1, description="Evaluate only the first windows.")
    device: str = Field("auto", description="auto, cpu or cuda.")


def evaluate_step(ctx: StepContext, params: EvaluateParams, inputs: dict[str, Path]) -> dict:
    row = evaluate_model_dir(inputs["model"], perplexity_text=inputs.get("text"),
                             seqlen=params.seqlen, max_windows=params.max_windows,
                             device=params.device)
    row["model"] = params.name
    row["perplexity_text"] = ctx.input_digests.get("text")  # the digest, not a scratch path
    ctx.log_metrics({k: row[k] for k in ("perplexity", "sparsity", "params", "size_bytes")
                     if row.get(k) is not None})
    path = write_rows([row], ctx.workdir / "evaluation.parquet")
    return {"evaluation": Output(path, "evaluation", "application/vnd.apache.parquet")}


STEP = Step(name="evaluate", version="1", params=EvaluateParams, inputs=("model",),
            fn=evaluate_step, optional_inputs=("text",))
