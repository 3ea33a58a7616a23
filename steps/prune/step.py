"""The prune step: model (+ allocation, + calibration text) -> pruned model and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from steps.core.step import Output, Step, StepContext
from steps.prune.api import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_NSAMPLES,
    DEFAULT_SEQLEN,
    REPORT_FILE,
    prune,
    save_pruned,
)


class PruneParams(BaseModel):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float | None = Field(None, ge=0, lt=1, description="One global ratio "
                                   "(unless an allocation input gives per-layer ratios).")
    nm: str | None = Field(None, description="N:M structured sparsity, e.g. 2:4.")
    nsamples: int = Field(DEFAULT_NSAMPLES, ge=1, description="Calibration sequences.")
    seqlen: int = Field(DEFAULT_SEQLEN, ge=8, description="Calibration tokens per sequence "
                        "(shrunk to the model's context).")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto, cpu or cuda.")
    batch_tokens: int = Field(DEFAULT_BATCH_TOKENS, ge=1, description="Calibration tokens "
                              "per block call (whole sequences, at least one; a GPU may "
                              "gain from more).")
    compressed: bool = Field(False, description="Store the weights as a bitmask and the kept "
                             "values (smaller; read back by tailwise, not by plain transformers).")


def prune_step(ctx: StepContext, params: PruneParams, inputs: dict[str, Path]) -> dict:
    from transformers import AutoTokenizer

    from steps.core.factory import load_model, plain_kind

    model = load_model(inputs["model"])
    if plain_kind(model) is not None:  # a factory MLP / CNN: magnitude, no tokenizer
        from steps.prune.plain import prune_plain

        tokenizer = None
        report = prune_plain(model, method=params.method, sparsity=params.sparsity,
                             allocation=inputs.get("allocation"), nm=params.nm)
    else:
        tokenizer = AutoTokenizer.from_pretrained(inputs["model"], local_files_only=True) \
            if "calibration" in inputs else None
        report = prune(model, tokenizer, method=params.method, sparsity=params.sparsity,
                       allocation=inputs.get("allocation"), nm=params.nm,
                       calibration_text=inputs.get("calibration"), nsamples=params.nsamples,
                       seqlen=params.seqlen, seed=params.seed, device=params.device,
                       batch_tokens=params.batch_tokens)
    out = save_pruned(model, tokenizer, ctx.workdir / "pruned", report, params.compressed)
    achieved = pq.read_table(out / REPORT_FILE)
    total = sum(achieved["params"].to_pylist())
    zeros = sum(a * p for a, p in zip(achieved["achieved"].to_pylist(),
                                      achieved["params"].to_pylist(), strict=True))
    ctx.log_metrics({"achieved_sparsity": zeros / total, "layers_pruned": achieved.num_rows})
    return {"model": Output(out, "model"),
            "report": Output(out / REPORT_FILE, "sparsity-report",
                             "application/vnd.apache.parquet")}


STEP = Step(name="prune", version="1", params=PruneParams, inputs=("model",), fn=prune_step,
            optional_inputs=("allocation", "calibration"))
