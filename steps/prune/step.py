"""The prune step: model (+ allocation, + calibration text) -> pruned model and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator, model_validator

from steps.core.errors import ParamsError
from steps.core.step import Output, Step, StepContext
from steps.prune.api import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_NSAMPLES,
    DEFAULT_SEQLEN,
    REPORT_FILE,
    parse_nm,
    prune,
    report_calibration,
    save_pruned,
)

CALIBRATION_PARAMS = ("nsamples", "seqlen", "seed", "batch_tokens")


class PruneParams(BaseModel):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float | None = Field(None, ge=0, lt=1, description="One global ratio "
                                   "(or an allocation input gives per-layer ratios).")
    nm: str | None = Field(None, description="N:M structured sparsity, e.g. 2:4.")
    nsamples: int | None = Field(DEFAULT_NSAMPLES, ge=1, description="Calibration sequences.")
    seqlen: int | None = Field(DEFAULT_SEQLEN, ge=8, description="Calibration tokens per "
                               "sequence (shrunk to the model's context; the report's "
                               "metadata records the length used).")
    seed: int | None = Field(0, ge=0, description="Seed of the calibration sample.")
    device: str = Field("auto", description="auto, cpu or cuda.")
    batch_tokens: int | None = Field(DEFAULT_BATCH_TOKENS, ge=1, description="Calibration "
                                     "tokens per block call (whole sequences, at least one; a "
                                     "GPU may gain from more).")
    compressed: bool = Field(False, description="Store the weights as a bitmask and the kept "
                             "values (smaller; read back by tailwise, not by plain transformers).")

    @field_validator("nm")
    @classmethod
    def _nm_pattern(cls, nm: str | None) -> str | None:
        if nm is not None:
            parse_nm(nm)  # '2-4', '4:2': refused before a model is loaded
        return nm

    @model_validator(mode="after")
    def _only_what_takes_effect(self) -> PruneParams:
        """Refuse a sparsity beside an N:M pattern; magnitude reads no calibration, so its
        manifest records none of the calibration params (they would not have taken effect)."""
        if self.nm is not None and self.sparsity is not None:
            raise ValueError("give a sparsity or an N:M pattern, not both")
        for name in CALIBRATION_PARAMS:
            if self.method == "magnitude":
                setattr(self, name, None)
            elif getattr(self, name) is None:  # the others always calibrate: say with what
                setattr(self, name, type(self).model_fields[name].default)
        return self


def check_inputs(params: PruneParams, inputs: frozenset[str]) -> None:
    """What params and inputs together must satisfy; checked before a model is loaded."""
    if "allocation" in inputs and params.sparsity is not None:
        raise ParamsError(f"prune: sparsity {params.sparsity} and an allocation conflict (the "
                          "allocation sets every layer's sparsity): give one of them")
    if "allocation" in inputs and params.nm is not None:
        raise ParamsError(f"prune: N:M pattern {params.nm} and an allocation conflict: give "
                          "one of them")
    if params.sparsity is None and params.nm is None and "allocation" not in inputs:
        raise ParamsError("prune: give a sparsity, an allocation or an N:M pattern")
    if params.method != "magnitude" and "calibration" not in inputs:
        raise ParamsError(f"prune: {params.method} needs a calibration text (a text file or "
                          "a built-in corpus such as kjv:train)")


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
        # Loaded whatever the method: the pruned model carries its tokenizer on.
        tokenizer = AutoTokenizer.from_pretrained(inputs["model"], local_files_only=True) \
            if has_tokenizer(inputs["model"]) else None
        report = prune(model, tokenizer, method=params.method, sparsity=params.sparsity,
                       allocation=inputs.get("allocation"), nm=params.nm,
                       calibration_text=inputs.get("calibration"), device=params.device,
                       progress=ctx.progress,
                       **params.model_dump(include=set(CALIBRATION_PARAMS), exclude_none=True))
    out = save_pruned(model, tokenizer, ctx.workdir / "pruned", report, params.compressed)
    achieved = pq.read_table(out / REPORT_FILE)
    total = sum(achieved["params"].to_pylist())
    zeros = sum(a * p for a, p in zip(achieved["achieved"].to_pylist(),
                                      achieved["params"].to_pylist(), strict=True))
    metrics = {"achieved_sparsity": zeros / total, "layers_pruned": achieved.num_rows}
    calibration = report_calibration(achieved)
    if calibration is not None:  # the seqlen used, which the model's context may have cut
        metrics |= {"calibration_seqlen": calibration["seqlen"],
                    "calibration_nsamples": calibration["nsamples"]}
    ctx.log_metrics(metrics)
    return {"model": Output(out, "model"),
            "report": Output(out / REPORT_FILE, "sparsity-report",
                             "application/vnd.apache.parquet")}


def has_tokenizer(model_dir: Path) -> bool:
    """Whether a model directory holds tokenizer files (fast or slow tokenizers)."""
    return any((model_dir / name).is_file() for name in
               ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))


STEP = Step(name="prune", version="1", params=PruneParams, inputs=("model",), fn=prune_step,
            optional_inputs=("allocation", "calibration"), check_inputs=check_inputs)
