"""Turn a corpus name and split into a text artifact (calibration or evaluation text).

The text is an artifact, so the lineage of a pruned model names the exact text it
was calibrated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from steps.core.step import Output, Step, StepContext


class BuildTextParams(BaseModel):
    corpus: Literal["kjv"] = Field("kjv", description="kjv: the King James Bible "
                                   "(Debian bible-kjv), split by chapter 90/5/5.")
    split: Literal["train", "validation", "test"] = "test"
    max_chars: int | None = Field(None, gt=0, description="Keep only the first characters "
                                  "(fast runs on a CPU).")


def build_text(ctx: StepContext, params: BuildTextParams, inputs: dict[str, Path]) -> dict:
    from steps.core.data import kjv_splits

    text = kjv_splits()[params.split].read_text()
    out = ctx.workdir / f"{params.corpus}-{params.split}.txt"
    out.write_text(text[: params.max_chars] if params.max_chars else text)
    return {"text": Output(out, "text", "text/plain")}


STEP = Step(name="build_text", version="1", params=BuildTextParams, inputs=(), fn=build_text)
