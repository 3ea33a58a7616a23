"""Turn a corpus name and split into a text artifact (calibration or evaluation text).

The CLI's built-in text names (`--calibration kjv:train`, `--perplexity fortunes`) run this
step with the same params a flow gives it, so both resolve to the same artifact.

The text is an artifact, so the lineage of a pruned model names the exact text it
was calibrated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from steps.core.step import Output, Step, StepContext


class BuildTextParams(BaseModel):
    corpus: Literal["kjv", "fortunes"] = Field(
        "kjv", description="kjv: the King James Bible (Debian bible-kjv), split by chapter "
        "90/5/5; fortunes: Debian's fortunes, every category, split by record 90/5/5.")
    split: Literal["train", "validation", "test"] = "test"
    max_chars: int | None = Field(None, gt=0, description="Keep only the first characters "
                                  "(fast runs on a CPU).")


def build_text(ctx: StepContext, params: BuildTextParams, inputs: dict[str, Path]) -> dict:
    from steps.core.data import corpus_text

    text = corpus_text(params.corpus, params.split)
    out = ctx.workdir / f"{params.corpus}-{params.split}.txt"
    out.write_text(text[: params.max_chars] if params.max_chars else text)
    return {"text": Output(out, "text", "text/plain")}


STEP = Step(name="build_text", version="1", params=BuildTextParams, inputs=(), fn=build_text)
